"""`mat report`: results.json files -> paper-style table with mean ± std over seeds."""

from __future__ import annotations

import json

import pytest

from mat_lightning.cli import main
from mat_lightning.eval.table import build_table


def write_run(folder, experiment, seed, tr1, pgd_tr1):
    folder.mkdir(parents=True)
    rows = [
        {"attack": "clean", "eps_255": 0.0, "tr_r1": tr1, "ir_r1": tr1 - 10},
        {"attack": "pgd", "eps_255": 2.0, "tr_r1": pgd_tr1, "ir_r1": pgd_tr1 - 5},
        {"attack": "pgd", "eps_255": 8.0, "tr_r1": 0.0, "ir_r1": 0.0},
    ]  # a grid row: not the headline
    (folder / "results.json").write_text(json.dumps({"experiment": experiment, "seed": seed, "rows": rows}))


def test_mean_and_std_over_seeds(tmp_path, capsys):
    write_run(tmp_path / "a" / "1", "mat", 0, 60.0, 30.0)
    write_run(tmp_path / "a" / "2", "mat", 1, 64.0, 34.0)
    write_run(tmp_path / "b" / "1", "clean", 0, 70.0, 20.0)
    main(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "table.md").read_text()
    assert md == capsys.readouterr().out.strip() + "\n"
    header, rows, records = build_table(
        [json.loads(p.read_text()) | {"_path": str(p)} for p in sorted(tmp_path.glob("[ab]/*/results.json"))]
    )
    assert header == ["experiment", "n", "clean TR@1", "clean IR@1", "pgd TR@1", "pgd IR@1"]
    by_name = {r[0]: r for r in rows}
    assert by_name["mat"][1:] == ["2", "62.0 ± 2.8", "52.0 ± 2.8", "32.0 ± 2.8", "27.0 ± 2.8"]
    assert by_name["clean"][1:] == ["1", "70.0", "60.0", "20.0", "15.0"]
    csv = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert csv[0] == "experiment,attack,metric,n,mean,std" and len(csv) == 1 + 8
    assert any(
        r["experiment"] == "mat" and r["metric"] == "tr_r1" and r["mean"] == pytest.approx(32.0)
        for r in records
    )


def test_report_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "no results.json" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "not valid JSON" in capsys.readouterr().err


def test_report_logs_the_table_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_run(tmp_path / "runs" / "a", "mat", 0, 60.0, 30.0)
    main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--wandb"])
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
