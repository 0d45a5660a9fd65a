"""The import graph: imports point one way, ``data -> models -> attacks -> defenses -> eval``, the synthetic world
above them, the glue (``module.py``, ``cli.py``, ``main.py``) on top. Read from the source (AST), nothing imported;
imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mat_lightning"

# Layer of each top-level part of the package: a module may import its own layer and those below it.
LAYERS = {
    # helpers every layer may use: they import nothing of the package but errors
    "errors": 0,
    "cache": 0,
    "files": 0,
    "losses": 0,
    "logging": 0,
    "faults": 0,
    "progress": 0,
    "options": 0,  # reads the CLI classes' signatures from their source (ast), imports none of them
    "checkpoints": 0,
    "data": 1,
    "models": 2,
    "attacks": 3,
    "defenses": 4,
    "eval": 5,
    "synthetic": 6,  # builds its CLIP and MLM with models/, reads its data with data/
    "module": 7,
    "cli": 8,
    "main": 8,
    "__main__": 9,
    "__init__": 9,
}
# Imports that go against the order today, each with its reason; a new one fails the test.
KNOWN_UPWARD = {
    # the synthetic world's CLIP pretraining reports its clean recall with the evaluation's recall@K
    ("models/pretrain.py", "eval"),
}
BELOW_THE_WORLD = ("data", "models", "attacks", "defenses", "eval", "errors", "cache", "files", "losses")


def part(module: str) -> str:
    """``mat_lightning.data.augment.eda`` -> ``data``; ``mat_lightning`` -> ``__init__``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The ``mat_lightning`` modules a file imports (``from mat_lightning import x`` counts as ``mat_lightning.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mat_lightning"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mat_lightning":
                found |= {f"mat_lightning.{a.name}" for a in node.names}
            elif node.module.startswith("mat_lightning."):
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {
        p.relative_to(PACKAGE).as_posix(): imports(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def test_the_parser_sees_lazy_and_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import mat_lightning.errors\nfrom mat_lightning import synthetic\n"
        "def f():\n    from mat_lightning.synthetic.assets import ensure_mlm\n"
    )
    assert imports(source) == {
        "mat_lightning.errors",
        "mat_lightning.synthetic",
        "mat_lightning.synthetic.assets",
    }


def test_nothing_below_the_synthetic_world_imports_it():
    offenders = [
        f"{file} imports {target}"
        for file, targets in graph().items()
        if file.split("/")[0].removesuffix(".py") in BELOW_THE_WORLD
        for target in targets
        if part(target) == "synthetic"
    ]
    assert not offenders, offenders


def test_the_synthetic_world_imports_no_attack_defense_or_evaluation():
    offenders = [
        f"{file} imports {target}"
        for file, targets in graph().items()
        if file.startswith("synthetic/")
        for target in targets
        if part(target) in ("attacks", "defenses", "eval", "module", "cli", "main")
    ]
    assert not offenders, offenders


def test_imports_point_one_way():
    offenders = []
    for file, targets in graph().items():
        own = file.split("/")[0].removesuffix(".py")
        assert own in LAYERS, f"{file}: add its part to LAYERS"
        for target in targets:
            theirs = part(target)
            if LAYERS[theirs] > LAYERS[own] and (file, theirs) not in KNOWN_UPWARD:
                offenders.append(f"{file} ({own}) imports {target} ({theirs})")
    assert not offenders, offenders
