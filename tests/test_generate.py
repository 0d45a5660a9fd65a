"""``mat augment rewrite|i2t``: precomputed caption files written by local HF models (tiny, randomly initialised)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mat_lightning.data.augment import PrecomputedCaptions
from mat_lightning.data.augment.generate import main as augment
from mat_lightning.data.formats import read_annotations
from mat_lightning.errors import ConfigError

CAPTIONS = [
    "a red circle left of a small blue square",
    "two shapes: a green star and a yellow box",
    "a photo of a purple triangle on a dark background",
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A randomly initialised GPT-2 (1 layer, width 32) with a byte-level BPE tokenizer trained on a few captions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CAPTIONS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,  # the rewriting prompt is long in a 300-token vocabulary
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A randomly initialised BLIP captioner (1 layer, width 32, 32 px) with a word-level BERT tokenizer."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-blip")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + sorted({w.strip(":") for c in CAPTIONS for w in c.split()})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        text_config={
            **small,
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "encoder_hidden_size": 32,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "bos_token_id": specials.index("[DEC]"),
        },
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def check_file(path: Path, ids: list[str], n: int) -> dict[str, list[str]]:
    data = json.loads(path.read_text())
    assert sorted(data) == sorted(ids)
    assert all(
        len(v) == n and all(isinstance(c, str) and c.strip() == c and c for c in v) for v in data.values()
    )
    source = PrecomputedCaptions(str(path))
    assert all(source.captions(i) == data[i] for i in ids)
    return data


def test_rewrite_writes_n_rewrites_per_image(tiny_world, tiny_lm, tmp_path):
    # An ALBEF-style train file: one caption per entry, images repeated.
    records = read_annotations(tiny_world, None, "train")[:4]
    entries = [{"image": r.image_id, "caption": c} for r in records for c in r.captions[:2]]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    out = tmp_path / "rewrite.json"
    augment(
        ["rewrite", "--model", str(tiny_lm), "--annotations", str(tmp_path / "train.json")]
        + ["--image_root", str(tiny_world.parent), "--n", "3", "--max_new_tokens", "4", "--out", str(out)]
    )
    data = check_file(out, [r.image_id for r in records], n=3)
    # Four new tokens of a 300-token BPE: the ~140-character prompt was stripped.
    assert all(len(c) < 60 and "Caption:" not in c for v in data.values() for c in v)


def test_i2t_writes_n_captions_per_image(tiny_world, tiny_blip, tmp_path):
    out = tmp_path / "i2t.json"
    augment(
        ["i2t", "--model", str(tiny_blip), "--annotations", str(tiny_world), "--split", "val", "--limit", "5"]
        + ["--n", "2", "--max_new_tokens", "6", "--batch_size", "4", "--out", str(out)]
    )
    ids = [r.image_id for r in read_annotations(tiny_world, None, "val")[:5]]
    data = check_file(out, ids, n=2)
    words = {w.strip(":") for c in CAPTIONS for w in c.split()}
    assert all(
        set(c.split()) <= words for v in data.values() for c in v
    )  # decoded from the model's vocabulary


def test_unloadable_model_is_a_config_error(tiny_world, tmp_path, capsys):
    from mat_lightning.cli import main

    (tmp_path / "empty").mkdir()
    args = [
        "--annotations",
        str(tiny_world),
        "--split",
        "val",
        "--limit",
        "1",
        "--out",
        str(tmp_path / "x.json"),
    ]
    with pytest.raises(ConfigError, match=rf"--model {tmp_path / 'empty'}: cannot load a tokenizer"):
        augment(["rewrite", "--model", str(tmp_path / "empty"), *args])
    with pytest.raises(ConfigError, match=r"--model .*/nowhere: folder not found"):
        augment(["i2t", "--model", str(tmp_path / "nowhere"), *args])
    with pytest.raises(ConfigError, match="unknown augment command"):
        augment(["t2i"])
    with pytest.raises(SystemExit) as e:  # through the `mat` command: one message, status 2
        main(["augment", "i2t", "--model", str(tmp_path / "empty"), *args])
    assert e.value.code == 2
    assert "cannot load a processor" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
