"""`mat report`: results.json files -> paper-style table with mean ± std over seeds."""

from __future__ import annotations

import json

import pytest

from mat_lightning.cli import main
from mat_lightning.eval.table import build_table

# The table's columns for runs evaluated clean and under PGD (what write_run writes).
REPORT_COLUMNS = ["experiment", "n", "seeds", "n_images", "clean TR@1", "clean IR@1", "pgd TR@1", "pgd IR@1"]


def write_run(folder, experiment, seed, tr1, pgd_tr1, **fields):
    folder.mkdir(parents=True)
    rows = [
        {"attack": "clean", "eps_255": 0.0, "tr_r1": tr1, "ir_r1": tr1 - 10},
        {"attack": "pgd", "eps_255": 2.0, "tr_r1": pgd_tr1, "ir_r1": pgd_tr1 - 5},
        {"attack": "pgd", "eps_255": 8.0, "tr_r1": 0.0, "ir_r1": 0.0},
    ]  # a grid row: not the headline
    payload = {"experiment": experiment, "seed": seed, "n_images": 200, **fields, "rows": rows}
    (folder / "results.json").write_text(json.dumps(payload))


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
    assert header == REPORT_COLUMNS
    by_name = {r[0]: r for r in rows}
    assert by_name["mat"][1:] == ["2", "0-1", "200", "62.0 ± 2.8", "52.0 ± 2.8", "32.0 ± 2.8", "27.0 ± 2.8"]
    assert by_name["clean"][1:] == ["1", "0", "200", "70.0", "60.0", "20.0", "15.0"]
    csv = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert csv[0] == "experiment,n_images,attack,eps_255,metric,n,seeds,mean,std" and len(csv) == 1 + 8
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
    """The offline run holds the printed table as the media of key ``report/table``, cell for cell.

    Bug caught: logging an empty table, the wrong rows (e.g. unaveraged runs) or under another key; a test that
    only saw a ``.wandb`` file would pass all three.
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    write_run(tmp_path / "runs" / "a", "mat", 0, 60.0, 30.0)
    write_run(tmp_path / "runs" / "b", "mat", 1, 64.0, 34.0)
    main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--wandb"])
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    (table_file,) = run_dir.glob("files/media/table/report/table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == REPORT_COLUMNS
    assert table["data"] == [
        ["mat", "2", "0-1", "200", "62.0 ± 2.8", "52.0 ± 2.8", "32.0 ± 2.8", "27.0 ± 2.8"]
    ]
    assert list(run_dir.glob("run-*.wandb"))  # the record stream `wandb sync` uploads


def test_report_never_averages_incomparable_runs(tmp_path, capsys):
    write_run(tmp_path / "a", "smoke", 0, 66.0, 30.0)
    write_run(tmp_path / "b", "smoke", 0, 80.0, 40.0, n_images=64)
    write_run(tmp_path / "c", "smoke", 1, 64.0, 28.0, weights="best")
    write_run(tmp_path / "d", "smoke", 2, 62.0, 26.0, weights="best")
    main(["report", str(tmp_path), "--metrics", "tr_r1"])
    captured = capsys.readouterr()
    assert (
        "smoke: 4 runs in 3 groups, not averaged together: they differ in n_images, weights" in captured.err
    )
    lines = {line.split(" | ")[0].lstrip("| "): line for line in captured.out.splitlines()[2:]}
    assert lines["smoke (n_images=200, weights=unknown)"].endswith("| 1 | 0 | 200 | 66.0 | 30.0 |")
    assert lines["smoke (n_images=64, weights=unknown)"].endswith("| 1 | 0 | 64 | 80.0 | 40.0 |")
    assert lines["smoke (n_images=200, weights=best)"].endswith("| 2 | 1-2 | 200 | 63.0 ± 1.4 | 27.0 ± 1.4 |")


def test_report_eps_formats_and_unknown_names(tmp_path, capsys):
    write_run(tmp_path / "a", "mat", 0, 60.0, 30.0)
    main(
        [
            "report",
            str(tmp_path),
            "--eps",
            "8",
            "--attacks",
            "pgd",
            "--format",
            "latex",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("\\begin{tabular}") and "mat & 1 & 0 & 200 & 0.0 & 0.0 \\\\" in out
    assert (tmp_path / "o" / "table.tex").read_text() == out
    main(["report", str(tmp_path), "--format", "csv", "--metrics", "ir_r1"] + ["--attacks", "clean"])
    assert capsys.readouterr().out == "experiment,n,seeds,n_images,clean IR@1\nmat,1,0,200,50.0\n"
    for bad in (["--metrics", "tr_r2"], ["--attacks", "sga"]):
        with pytest.raises(SystemExit) as e:
            main(["report", str(tmp_path), *bad])
        assert e.value.code == 2 and bad[1] in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"42", "not a mat results.json"),
        (b'{"rows": [{"tr_r1": 1.0}]}', "rows[0] has no 'attack'"),
        (b'{"rows": [{"attack": "clean", "tr_r1": "high"}]}', "tr_r1 = 'high' is not a number"),
        (b'{"rows": []}\xff\xfe', "not UTF-8"),
    ],
)
def test_report_odd_files_give_one_message_naming_the_file(tmp_path, capsys, content, message):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and str(tmp_path / "x" / "results.json") in err
    assert "Traceback" not in err
