"""Synthetic-world names -> asset paths, in one place at the top (mat_lightning.synthetic.resolve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mat_lightning import synthetic
from mat_lightning.errors import ConfigError
from mat_lightning.synthetic import resolve_config


def bert(mlm: str) -> dict:
    return {"class_path": "mat_lightning.attacks.BertAttack", "init_args": {"mlm": mlm, "top_k": 3}}


def config(dataset: str = "synthetic", **data) -> dict:
    """The shape of a parsed `mat` config (jsonargparse gives Namespaces; plain dicts resolve alike)."""
    return {
        "data": {"dataset": dataset, "world": "tiny", "annotations": None, **data},
        "model": {
            "encoder": {"class_path": "OpenClipEncoder", "init_args": {"pretrained": "synthetic:tiny"}},
            "defense": {
                "class_path": "mat_lightning.defenses.MAT",
                "init_args": {"text_attack": bert("synthetic")},
            },
        },
        "robust_eval": {
            "mlm": None,
            "attacks": [
                bert("synthetic:tiny"),
                {
                    "class_path": "mat_lightning.attacks.SGA",
                    "init_args": {"image_attack": {"class_path": "PGD"}, "text_attack": bert("synthetic")},
                },
            ],
        },
        "local_models": {"bert-base-uncased": "synthetic:tiny", "other": "/models/other"},
    }


def test_every_name_becomes_its_asset_path(tiny_world, tiny_clip_path, tiny_mlm):
    cfg = resolve_config(config())
    assert cfg["data"]["annotations"] == str(tiny_world)
    assert (
        cfg["data"]["dataset"] == "synthetic" and cfg["data"]["world"] == "tiny"
    )  # what results.json reports
    assert cfg["model"]["encoder"]["init_args"]["pretrained"] == str(tiny_clip_path)
    # a bare `synthetic` is the data's world, wherever an mlm sits: defense, attack, nested attack, local_models
    assert cfg["model"]["defense"]["init_args"]["text_attack"]["init_args"]["mlm"] == tiny_mlm
    assert cfg["robust_eval"]["attacks"][0]["init_args"]["mlm"] == tiny_mlm
    assert cfg["robust_eval"]["attacks"][1]["init_args"]["text_attack"]["init_args"]["mlm"] == tiny_mlm
    assert cfg["local_models"] == {"bert-base-uncased": tiny_mlm, "other": "/models/other"}
    assert cfg["robust_eval"]["attacks"][0]["init_args"]["top_k"] == 3  # everything else untouched


def test_augmentations_and_thesaurus(tiny_world):
    source = "mat_lightning.data.augment.PrecomputedCaptions"
    cfg = config(
        one_to_many={
            "class_path": "mat_lightning.data.augment.OneToMany",
            "init_args": {
                "caption_sources": [{"class_path": source, "init_args": {"path": "synthetic:i2t"}}],
                "image_sources": [
                    {
                        "class_path": "mat_lightning.data.augment.PrecomputedImages",
                        "init_args": {"path": "synthetic:t2i:tiny"},
                    }
                ],
                "eda": {
                    "class_path": "mat_lightning.data.augment.EDA",
                    "init_args": {"thesaurus": "synthetic"},
                },
            },
        }
    )
    o2m = resolve_config(cfg)["data"]["one_to_many"]["init_args"]
    root = synthetic.ensure_augmentations("tiny")
    assert o2m["caption_sources"][0]["init_args"]["path"] == str(root / "i2t.json")
    assert o2m["image_sources"][0]["init_args"]["path"] == str(root / "t2i.json")
    thesaurus = o2m["eda"]["init_args"]["thesaurus"]
    assert thesaurus == str(tiny_world.parent / "thesaurus.json")
    assert json.loads(Path(thesaurus).read_text()) == synthetic.classic.thesaurus()


@pytest.mark.parametrize(
    ("data", "source", "message"),
    [
        ({}, ("Captions", "synthetic:t2i"), r"kind in \['rewrite', 'i2t'\]"),
        ({}, ("Images", "synthetic:i2t"), r"kind in \['t2i'\]"),
        ({}, ("Captions", "synthetic:i2t:default"), "names world preset 'default', but data.world='tiny'"),
        (
            {"dataset": "flickr30k", "root": "/data"},
            ("Captions", "synthetic:i2t"),
            "only fit data.dataset=synthetic",
        ),
    ],
)
def test_bad_augmentation_names(tiny_world, data, source, message):
    kind, path = source
    cfg = config(**data)
    cfg["data"]["one_to_many"] = {
        "class_path": "mat_lightning.data.augment.OneToMany",
        "init_args": {
            "caption_sources" if kind == "Captions" else "image_sources": [
                {"class_path": f"mat_lightning.data.augment.Precomputed{kind}", "init_args": {"path": path}}
            ]
        },
    }
    with pytest.raises(ConfigError, match=message):
        resolve_config(cfg)


def test_unknown_preset_and_malformed_names(tiny_world):
    with pytest.raises(ConfigError, match="unknown synthetic world preset 'huge'"):
        resolve_config({"data": {"dataset": "synthetic", "world": "huge", "annotations": None}})
    with pytest.raises(ConfigError, match=r"robust_eval.attacks\[0\].init_args.mlm='synthetic:'"):
        resolve_config({"robust_eval": {"attacks": [bert("synthetic:")]}})


def test_real_data_keeps_its_paths_and_warns_on_a_synthetic_mlm(tiny_mlm, caplog):
    cfg = config("flickr30k", root="/data/flickr30k")
    cfg["model"]["encoder"]["init_args"]["pretrained"] = "openai"
    with caplog.at_level("WARNING", logger="mat_lightning"):
        resolve_config(cfg)
    assert (
        cfg["data"]["annotations"] is None and cfg["model"]["encoder"]["init_args"]["pretrained"] == "openai"
    )
    assert cfg["robust_eval"]["attacks"][1]["init_args"]["text_attack"]["init_args"]["mlm"] == tiny_mlm
    assert (
        "robust_eval.attacks[1].init_args.text_attack.init_args.mlm='synthetic': the synthetic world's masked LM on "
        "flickr30k captions" in caplog.text
    )


def test_data_check_resolves_the_world(tiny_world, capsys):
    from mat_lightning.cli import main

    main(["data", "check", "--data.dataset=synthetic", "--data.world=tiny", "--decode=false"])
    out = capsys.readouterr().out
    assert "synthetic (synthetic world)" in out and "384" in out and out.count("ok") == 3


def test_the_world_clip_brings_its_architecture(monkeypatch, tmp_path):
    """``pretrained: synthetic`` names the preset's CLIP, checkpoint and architecture: a preset that sizes its CLIP
    (rich: ``mat-rich16``) replaces the config's ``model_name``; others keep it."""
    from mat_lightning.synthetic import assets

    monkeypatch.setattr(
        assets, "ensure_clip", lambda name: tmp_path / f"clip-{name}.pt"
    )  # no 12-min build here
    encoder = {
        "class_path": "OpenClipEncoder",
        "init_args": {"model_name": "mat-tiny", "pretrained": "synthetic:rich"},
    }
    cfg = resolve_config({"model": {"encoder": encoder}})
    assert cfg["model"]["encoder"]["init_args"] == {
        "model_name": synthetic.PRESETS["rich"].clip.model_name,
        "pretrained": str(tmp_path / "clip-rich.pt"),
    }
    assert synthetic.PRESETS["rich"].clip.model_name == "mat-rich16"
    encoder["init_args"] = {"model_name": "mat-tiny", "pretrained": "synthetic:tiny"}
    cfg = resolve_config({"model": {"encoder": encoder}})
    assert cfg["model"]["encoder"]["init_args"]["model_name"] == "mat-tiny"


def test_the_saved_config_names_the_world_clip_architecture(monkeypatch):
    """What the CLI applies to the config it saves: the preset's architecture beside a bare ``synthetic`` (the data's
    world) or ``synthetic:<preset>``, with nothing built and the names kept."""
    from mat_lightning.synthetic import assets

    def no_build(*args, **kwargs):
        raise AssertionError("name_architectures must not build assets")

    monkeypatch.setattr(assets, "ensure_clip", no_build)
    init = {"model_name": "mat-tiny", "pretrained": "synthetic"}
    cfg = {
        "data": {"dataset": "synthetic", "world": "cnn"},
        "model": {"encoder": {"class_path": "OpenClipEncoder", "init_args": init}},
        "robust_eval": {
            "attacks": [{"init_args": {"surrogate": {"model_name": "x", "pretrained": "synthetic:rich"}}}]
        },
    }
    synthetic.name_architectures(cfg)
    assert init == {"model_name": "mat-tiny-rn", "pretrained": "synthetic"}
    assert cfg["robust_eval"]["attacks"][0]["init_args"]["surrogate"]["model_name"] == "mat-rich16"
    real = {"model_name": "ViT-B-16", "pretrained": "openai"}
    synthetic.name_architectures({"model": {"encoder": {"init_args": real}}})
    assert real["model_name"] == "ViT-B-16"
