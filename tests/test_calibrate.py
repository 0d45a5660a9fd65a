"""`make calibrate`'s table: flip rates beside the reference, and the verdict of each target."""

from __future__ import annotations

from benchmarks.calibrate import REFERENCE, SYNONYM_ROW, table


def row(attack: str, tr: float, ir: float, **extra) -> dict:
    return {"attack": attack, "eps_255": 2.0, "asr_flip_tr_r1": tr, "asr_flip_ir_r1": ir, **extra}


def test_targets_are_judged_against_the_reference():
    rows = [
        {"attack": "clean", "eps_255": 0.0, "tr_r1": 72.0, "ir_r1": 54.9},
        row("pgd", 80.9, 68.6),  # both exactly 10 points off: within
        row("bert_attack", 28.3, 49.2),  # IR 10.1 off: out
        row("sep_attack", 79.8, 86.8),
        row("co_attack", 93.3, 95.9),
        # sga not run
        {"attack": SYNONYM_ROW, "eps_255": None, "tr_r1": 67.0, "ir_r1": 50.0},
    ]
    text, verdict = table({"rows": rows, "n_images": 10})
    assert verdict == {
        "pgd": True,
        "bert_attack": False,
        "sep_attack": True,
        "co_attack": True,
        "sga": False,
        "clean": False,  # IR@1 54.9 < 55
        "synonym": True,  # drops 5.0 and 4.9
    }
    assert "| sga | – | 99.1 | – | 98.9 | not run |" in text
    assert "R@1 drop TR 5.0, IR 4.9" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert set(REFERENCE) == {"pgd", "bert_attack", "sep_attack", "co_attack", "sga"}
