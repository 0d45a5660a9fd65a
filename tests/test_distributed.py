"""DDP end to end on 2 CPU processes (gloo) against one process: the same weights after training at the same global
batch, the same robust-evaluation rows at other evaluation batch sizes, one results file, one W&B run, one export,
and none of the Lightning warnings the code can avoid.

Each run is a ``python -m mat_lightning`` subprocess (Lightning's DDP launcher re-executes the command), one thread
per process. Four runs in all: MAT and Clean, each on 2 processes x 8 images and 1 process x 16 images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# MAT with attacks whose objectives read no other image of the batch (image-guided BERT-Attack, SGA's caption cosine)
MAT = """
class_path: mat_lightning.defenses.MAT
init_args:
  text_attack: {class_path: mat_lightning.attacks.BertAttack, init_args: {mlm: "synthetic:tiny", top_k: 3}}
  image_attack: {class_path: mat_lightning.attacks.PGD, init_args: {steps: 2, step_255: 1, objective: caption_cosine}}
"""
SUITE = """
attacks:
  - class_path: mat_lightning.attacks.PGD
    init_args: {eps_255: 2, steps: 3, step_255: 1, objective: split_contrastive}
  - class_path: mat_lightning.attacks.SGA
    init_args:
      image_attack: {class_path: mat_lightning.attacks.PGD, init_args: {eps_255: 2, steps: 2, step_255: 1}}
      text_attack: {class_path: mat_lightning.attacks.BertAttack, init_args: {mlm: "synthetic:tiny", top_k: 3}}
"""
# Lightning's messages that a DDP run of ours must not print (each was printed before this was fixed)
AVOIDABLE = ("sync_dist", "all_gather is deprecated", "DistributedSampler", "evaluated exactly once")


def fit(root: Path, name: str, processes: int, batch: int, eval_batch: int, extra: list[str]) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MAT_RUN_DIR", None)
    cmd = [
        *(sys.executable, "-m", "mat_lightning", "fit"),
        *("--data.world=tiny", "--model.encoder.init_args.pretrained=synthetic:tiny"),
        *("--trainer.enable_progress_bar=false", "--robust_eval.progress=false", "--trainer.accelerator=cpu"),
        f"--trainer.devices={processes}",
        *(["--trainer.strategy=ddp"] if processes > 1 else []),
        *(
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={STEPS}",
            "--trainer.log_every_n_steps=1",
        ),
        *(f"--data.batch_size={batch}", f"--data.eval_batch_size={eval_batch}", "--data.max_eval_images=16"),
        *("--model.lr=1e-3", f"--run_root={root}", f"--experiment={name}"),
        *extra,
    ]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for message in AVOIDABLE:
        assert message not in out.stdout + out.stderr, f"{name}: Lightning warns about {message!r}"
    (run,) = (root / name).iterdir()  # one run folder, however many processes
    return run


def encoder_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("encoder.") and v.is_floating_point()}


def assert_same_training(one: Path, two: Path, start: dict[str, torch.Tensor]) -> None:
    """The two runs moved the weights the same way, up to float noise.

    Attention key biases are left out: they shift every logit of a query equally, so their exact gradient is 0 and
    the computed one is rounding noise, which Adam turns into steps of ±lr that differ with the reduction order.
    """
    assert_same_update(encoder_weights(one), encoder_weights(two), start)


def assert_same_update(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
):
    """Weights ``a`` and ``b`` moved away from ``start`` the same way, up to float noise (see above)."""

    def delta(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for key, value in weights.items():
            d = (value - start[key]).flatten()
            if key.endswith("in_proj_bias"):  # [query | key | value] biases
                n = d.numel() // 3
                d = torch.cat([d[:n], d[2 * n :]])
            parts.append(d)
        return torch.cat(parts)

    moved, other = delta(a), delta(b)
    assert moved.norm() > 1e-2  # training changed the weights ...
    ratio = ((moved - other).norm() / moved.norm()).item()
    assert ratio < 1e-3, ratio  # ... and 2 processes changed them as one process did


@pytest.fixture(scope="module")
def start_weights(tiny_clip_path):
    from mat_lightning.models.encoder import OpenClipEncoder

    encoder = OpenClipEncoder("mat-tiny", pretrained=str(tiny_clip_path))
    return {f"encoder.{k}": v for k, v in encoder.state_dict().items() if v.is_floating_point()}


def test_mat_under_ddp_trains_and_evaluates_as_one_process(tmp_path, start_weights):
    (tmp_path / "mat.yaml").write_text(MAT)
    (tmp_path / "suite.yaml").write_text(SUITE)
    common = [f"--model.defense={tmp_path / 'mat.yaml'}", f"--robust_eval={tmp_path / 'suite.yaml'}"]
    one = fit(tmp_path, "one", 1, 16, 16, [*common, f"--robust_eval.export_dir={tmp_path / 'export1'}"])
    two = fit(tmp_path, "two", 2, 8, 3, [*common, f"--robust_eval.export_dir={tmp_path / 'export2'}"])
    assert_same_training(one, two, start_weights)

    rows1 = json.loads((one / "results.json").read_text())["rows"]
    rows2 = json.loads((two / "results.json").read_text())["rows"]
    assert [r["attack"] for r in rows2] == ["clean", "pgd", "sga"]
    for r1, r2 in zip(rows1, rows2, strict=True):
        for key in r1.keys() - {"seconds"}:
            assert r2[key] == pytest.approx(r1[key], abs=1e-6), (r1["attack"], key)
    # one results file, one W&B run, one complete export per attack
    assert len(list(tmp_path.rglob("results.json"))) == 2
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert not list(two.glob("wandb/*/files/wandb-metadata.json"))[1:]
    for tag in ("pgd_eps2", "sga_eps2"):
        index = json.loads((tmp_path / "export2" / tag / "captions.json").read_text())
        assert [e["image_index"] for e in index] == list(range(16))
        assert index == json.loads((tmp_path / "export1" / tag / "captions.json").read_text())
        for e in index:
            pt = Path(e["image"]).with_suffix(".pt")
            x1, x2 = (torch.load(tmp_path / d / tag / pt, weights_only=True) for d in ("export1", "export2"))
            assert (
                x1 - x2
            ).abs().max() <= 2 / 255  # the same adversarial image up to float noise in the weights


def test_clean_under_ddp_trains_as_one_process(tmp_path, start_weights):
    common = ["--robust_eval.attacks=[]"]
    one = fit(tmp_path, "one", 1, 16, 16, common)
    two = fit(tmp_path, "two", 2, 8, 5, common)
    assert_same_training(one, two, start_weights)
