"""OpenClipEncoder: pixels in [0,1] with normalisation inside, local checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch

from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import CONFIG_DIR, OpenClipEncoder


def test_normalisation_happens_inside(random_encoder):
    x = torch.rand(3, 3, 64, 64)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = random_encoder.encode_image(x)
        ref = torch.nn.functional.normalize(random_encoder.model.encode_image((x - mean) / std), dim=-1)
    torch.testing.assert_close(ours, ref)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3))
    raw = random_encoder.encode_image(x, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_text_tokenised_inside(random_encoder):
    t = random_encoder.encode_text(["a red circle", "a blue square", "a red circle"])
    assert t.shape == (3, 64)
    torch.testing.assert_close(t[0], t[2])


def test_local_checkpoint_roundtrip(tmp_path, random_encoder):
    path = tmp_path / "clip.pt"
    torch.save(random_encoder.model.state_dict(), path)
    loaded = OpenClipEncoder("mat-tiny", pretrained=str(path))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), random_encoder.encode_image(x))
        torch.testing.assert_close(loaded.encode_text(["a dot"]), random_encoder.encode_text(["a dot"]))


def test_vision_checkpoint_loads_only_the_image_tower(tmp_path, random_encoder):
    path = tmp_path / "vision.pt"
    torch.save(random_encoder.model.visual.state_dict(), path)
    torch.manual_seed(123)
    other = OpenClipEncoder("mat-tiny", pretrained=None, vision_checkpoint=str(path))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(x), random_encoder.encode_image(x))
        assert not torch.allclose(other.encode_text(["a dot"]), random_encoder.encode_text(["a dot"]))


def test_tower_parameters_partition_the_model(random_encoder):
    vision = {id(p) for p in random_encoder.vision_parameters()}
    text = {id(p) for p in random_encoder.text_parameters()}
    everything = {id(p) for p in random_encoder.parameters()}
    assert not vision & text
    assert everything - vision - text == {id(random_encoder.model.logit_scale)}


def test_clear_errors(tmp_path, random_encoder):
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        OpenClipEncoder("mat-tiny", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        OpenClipEncoder("ViT-Nope", pretrained=None)
    with pytest.raises(ConfigError, match="not an open_clip tag of 'mat-tiny'"):
        OpenClipEncoder("mat-tiny", pretrained="openai")  # no such tag for the tiny config; never downloads
    with pytest.raises(ValueError, match="expects 64x64 images"):
        random_encoder.encode_image(torch.rand(1, 3, 32, 32))


def test_vision_checkpoint_errors_are_named(tmp_path, random_encoder):
    with pytest.raises(ConfigError, match="no such file"):
        OpenClipEncoder("mat-tiny", pretrained=None, vision_checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"not_a_tower.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="does not fit this model's image tower"):
        OpenClipEncoder("mat-tiny", pretrained=None, vision_checkpoint=str(tmp_path / "wrong.pt"))
    # RobustVLM/TeCoA layout with a DataParallel prefix loads
    wrapped = {
        "vision_encoder_state_dict": {
            f"module.{k}": v for k, v in random_encoder.model.visual.state_dict().items()
        }
    }
    torch.save(wrapped, tmp_path / "tecoa.pt")
    other = OpenClipEncoder("mat-tiny", pretrained=None, vision_checkpoint=str(tmp_path / "tecoa.pt"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.encode_image(x), random_encoder.encode_image(x))


def test_word_cached_tokenizer_equals_open_clip(random_encoder, flickr_test_json, tiny_test_split):
    from mat_lightning.data.formats import read_annotations

    captions = [c for r in read_annotations(flickr_test_json, "/") for c in r.captions]
    captions += [c for caps in tiny_test_split[1] for c in caps]
    captions += [
        "  double  space,and comma",
        "Café &amp; naïve",
        "a " * 40,
    ]  # odd spacing, unicode, truncation
    torch.testing.assert_close(random_encoder.tokenize(captions), random_encoder.tokenizer(captions))


@pytest.mark.parametrize("context_length", [32, 77])
def test_text_context_cut_to_tokens_in_use_is_exact(
    random_encoder, flickr_test_json, tiny_test_split, context_length
):
    """Length-bucketed, cut-context text encoding equals open_clip's full-context encode_text (Flickr30K captions)."""
    import open_clip

    from mat_lightning.data.formats import read_annotations

    if (
        context_length != random_encoder.model.context_length
    ):  # a tiny text tower with CLIP's 77-token context
        torch.manual_seed(0)
        text_cfg = {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        }
        vision_cfg = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
        random_encoder.model = open_clip.CLIP(64, vision_cfg, text_cfg).eval()
        random_encoder.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        random_encoder._word_ids = {}
    assert random_encoder._can_cut_context()
    captions = [c for r in read_annotations(flickr_test_json, "/") for c in r.captions][:300]
    captions += [c for caps in tiny_test_split[1] for c in caps][:60]
    captions += ["a " * 80, "!", "a dog ! ! !"]  # truncated at the context, id 0 ("!") inside a caption
    with torch.no_grad():
        for batch in (
            captions,
            captions[:5],
            captions[-3:],
        ):  # bucketed (4 forwards) and single-forward paths
            ids = random_encoder.tokenize(batch)
            full = random_encoder.model.encode_text(ids, normalize=True)
            torch.testing.assert_close(random_encoder.encode_text(batch), full, atol=2e-6, rtol=1e-5)
            raw = random_encoder.model.encode_text(ids)
            torch.testing.assert_close(
                random_encoder.encode_text(batch, normalize=False), raw, atol=1e-5, rtol=1e-5
            )
    # gradients flow through the buckets back to the weights (training uses this path)
    random_encoder.encode_text(captions[:130]).sum().backward()
    assert random_encoder.model.token_embedding.weight.grad is not None


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
def test_every_shipped_tiny_config_builds_quietly_and_keeps_the_contract(name, caplog):
    """The synthetic worlds' CLIPs (ViT and ResNet image towers): 64 px images in [0, 1], unit-norm embeddings, the
    towers partitioning the parameters, and no open_clip warning when random weights are asked for."""
    with caplog.at_level("WARNING"):
        enc = OpenClipEncoder(name, pretrained=None)
    assert not [r for r in caplog.records if "pretrained" in r.getMessage()]
    assert enc.image_size == 64
    with torch.no_grad():
        img, txt = enc.encode_image(torch.rand(2, 3, 64, 64)), enc.encode_text(["a red circle", "a blue box"])
    assert img.shape == txt.shape == (2, 64)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    vision = {id(p) for p in enc.vision_parameters()}
    text = {id(p) for p in enc.text_parameters()}
    assert not vision & text and {id(p) for p in enc.parameters()} - vision - text == {
        id(enc.model.logit_scale)
    }
