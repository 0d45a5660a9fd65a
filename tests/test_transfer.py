"""Transfer evaluation: exported adversarial sets replayed on other models (``Transferred``, ``mat transfer``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mat_lightning.attacks.transfer import Transferred
from mat_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_set(folder: Path, images: dict[int, np.ndarray], captions: dict[int, list[str]]) -> None:
    (folder / "images").mkdir(parents=True)
    entries = []
    for index, pixels in images.items():
        Image.fromarray(pixels).save(folder / "images" / f"{index:06d}.png")
        entries.append({"image": f"images/{index:06d}.png", "caption": captions[index], "image_index": index})
    (folder / "captions.json").write_text(json.dumps(entries))
    (folder / "set.json").write_text(json.dumps({"attack": "sga", "eps_255": 2.0, "modality": "multimodal"}))


def test_replays_each_image_and_its_captions_by_split_index(tmp_path):
    """A batch in another order than the set gets, row by row, its own image (8-bit, resized bicubically to the
    target's size) and its own captions in order; a shifted index or a caption mix-up fails."""
    rng = np.random.default_rng(0)
    images = {i: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in (3, 7)}
    captions = {3: ["adv three a", "adv three b"], 7: ["adv seven"]}
    write_set(tmp_path / "sga_eps2", images, captions)
    attack = Transferred(str(tmp_path / "sga_eps2"))
    assert attack.name == "transfer_sga_eps2" and attack.source_eps_255 == 2.0 and attack.eps_255 is None
    batch = torch.zeros(2, 3, 32, 32)
    clean_captions = ["seven", "three a", "three b"]
    txt2img = torch.tensor([0, 1, 1])
    out = attack(None, batch, clean_captions, txt2img, image_ids=torch.tensor([7, 3]))
    assert out.captions == ["adv seven", "adv three a", "adv three b"]
    for row, index in enumerate((7, 3)):
        expected = torch.from_numpy(images[index]).permute(2, 0, 1).float()[None] / 255
        expected = torch.nn.functional.interpolate(
            expected, size=(32, 32), mode="bicubic", align_corners=False
        )
        assert torch.allclose(out.images[row], expected[0].clamp(0, 1), atol=1e-6)
    with pytest.raises(ConfigError, match="no adversarial image for test image 5"):
        attack(None, batch, clean_captions, txt2img, image_ids=torch.tensor([7, 5]))
    with pytest.raises(ConfigError, match="2 captions here but 1"):
        attack(None, batch, clean_captions, torch.tensor([0, 0, 1]), image_ids=torch.tensor([7, 3]))


def test_not_a_set_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no captions.json"):
        Transferred(str(tmp_path))


def test_mat_transfer_on_the_source_itself_gives_its_white_box_text_rows(tmp_path, tiny_clip_path):
    """Export a text attack on 4 tiny-world images, then ``mat transfer`` it to the same model: the captions are
    replayed exactly and the images are the clean 8-bit ones, so the transferred row must equal the white-box row
    (recall and both ASRs); the table files name every set and target."""
    import subprocess

    base = [
        "--config",
        str(REPO / "experiments" / "smoke.yaml"),
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--data.max_eval_images=4",
        "--robust_eval.progress=false",
        "--trainer.enable_progress_bar=false",
    ]
    suite = json.dumps(
        [
            {
                "class_path": "mat_lightning.attacks.bert_attack.BertAttack",
                "init_args": {"mlm": "synthetic:tiny", "name": "bert_attack"},
            }
        ]
    )
    env_run = dict(capture_output=True, text=True, timeout=600, cwd=tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mat_lightning",
            "robust-eval",
            *base,
            "--robust_eval.attacks=[]",
            f"--robust_eval.attacks={suite}",
            f"--run_root={tmp_path / 'src'}",
            f"--export={tmp_path / 'adv'}",
        ],
        **env_run,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    white = json.loads(next((tmp_path / "src").glob("*/*/results.json")).read_text())["rows"]
    target = REPO / "experiments" / "smoke.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mat_lightning",
            "transfer",
            "--sets",
            str(tmp_path / "adv"),
            "--target",
            str(target),
            "--run_root",
            str(tmp_path / "out"),
            "--",
            *base[2:],
        ],
        **env_run,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| bert_attack |" in done.stdout and "LightningCLI's args" not in done.stderr
    table = json.loads(next((tmp_path / "out").glob("transfer/*/transfer.json")).read_text())
    assert table["sources"]["transfer_bert_attack"]["attack"] == "bert_attack"
    row = table["targets"]["smoke"]["rows"]["transfer_bert_attack"]
    for key, value in white[1].items():
        if key.startswith(("tr_", "ir_", "asr_")):
            assert row[key] == pytest.approx(value), key
    assert table["targets"]["smoke"]["clean"]["tr_r1"] == pytest.approx(white[0]["tr_r1"])
