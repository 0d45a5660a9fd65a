"""ALBEF / TCL against outputs of their published model code (tests/fixtures/albef/README.md says how they were made).

The fixtures hold each model's full checkpoint (momentum encoders and queues included) and its ITC embeddings and
ITM scores on fixed images and captions. Our class must load the checkpoint with no missing or unexpected key and
reproduce every output within 1e-5: a wrong layer split, a [SEP] token, a missing final LayerNorm, the wrong
normalisation or an ITM score with the ITC similarity added would each fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mat_lightning.errors import ConfigError
from mat_lightning.models.albef import AlbefRetrievalEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "albef"


def tiny_encoder(ref: dict, checkpoint: str | None, **kw) -> AlbefRetrievalEncoder:
    bert, vit = ref["bert_config"], ref["vit"]
    return AlbefRetrievalEncoder(
        checkpoint=checkpoint,
        tokenizer=str(FIXTURES),
        image_size=vit["img_size"],
        embed_dim=ref["cfg"]["embed_dim"],
        vision={
            "patch_size": vit["patch_size"],
            "width": vit["embed_dim"],
            "depth": vit["depth"],
            "heads": 2,
        },
        text={
            k: bert[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "vocab_size",
                "fusion_layer",
            )
        },
        **kw,
    ).eval()


def reference(name: str, tmp_path: Path) -> tuple[dict, str]:
    ref = torch.load(FIXTURES / f"{name}_tiny.pt", weights_only=True)
    ckpt = tmp_path / f"{name}.pth"
    torch.save(ref["checkpoint"], ckpt)
    return ref, str(ckpt)


@pytest.mark.parametrize("name", ["albef", "tcl"])
def test_reproduces_the_published_model_code(name, tmp_path):
    ref, ckpt = reference(name, tmp_path)
    enc = tiny_encoder(ref, ckpt)
    with torch.no_grad():
        ids, mask = enc.tokenize(ref["captions"])
        for row in range(len(ids)):  # their padding='max_length' vs ours 'longest': compare the real tokens
            n = int(mask[row].sum())
            assert ids[row, :n].tolist() == ref["input_ids"][row, :n].tolist()
            assert (ref["input_ids"][row, n:] == 0).all()
        assert ids.shape[1] == 30  # the long caption: [CLS] + 29 pieces, no [SEP]
        image_itc = enc.encode_image(ref["images"])
        text_itc = enc.encode_text(ref["captions"])
        states = enc.vision_states(ref["images"])
        n_txt = len(ref["captions"])
        itm = torch.stack(
            [enc.itm_scores(states[i : i + 1].expand(n_txt, -1, -1), ref["captions"]) for i in range(3)]
        )
    assert (image_itc - ref["image_itc"]).abs().max() <= 1e-5
    assert (text_itc - ref["text_itc"]).abs().max() <= 1e-5
    assert (itm - ref["itm"]).abs().max() <= 1e-5
    assert float(enc.logit_scale.detach()) == pytest.approx(1 / ref["temp"], rel=1e-6)


def test_pretraining_layout_and_other_resolution_load_as_albef_does(tmp_path):
    """ALBEF.pth layout: ``text_encoder.bert.*`` + an MLM head, position embeddings of another grid, resized as
    their ``interpolate_pos_embed`` does (compared with its output, stored in the fixture)."""
    ref, _ = reference("albef", tmp_path)
    state = {}
    for key, value in ref["checkpoint"]["model"].items():
        if key.startswith("text_encoder."):
            key = key.replace("text_encoder.", "text_encoder.bert.", 1)
        state[key] = value
    state["text_encoder.cls.predictions.bias"] = torch.zeros(ref["bert_config"]["vocab_size"])
    ckpt = tmp_path / "pretrain.pth"
    torch.save({"model": state, "epoch": 29}, ckpt)
    big = ref["vit"]["img_size"] + 2 * ref["vit"]["patch_size"]
    bert, vit = ref["bert_config"], ref["vit"]
    enc = AlbefRetrievalEncoder(
        checkpoint=str(ckpt),
        tokenizer=str(FIXTURES),
        image_size=big,
        embed_dim=16,
        vision={"patch_size": 16, "width": vit["embed_dim"], "depth": vit["depth"], "heads": 2},
        text={
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "vocab_size": bert["vocab_size"],
            "fusion_layer": 2,
        },
    )
    got = enc.visual_encoder.pos_embed.detach()
    assert got.shape == ref["pos_resized"].shape
    assert (got - ref["pos_resized"]).abs().max() <= 1e-6


def test_wrong_checkpoints_fail_with_one_line_naming_the_keys(tmp_path):
    ref, _ = reference("albef", tmp_path)
    state = dict(ref["checkpoint"]["model"])
    del state["itm_head.weight"]
    state["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(ConfigError) as err:
        tiny_encoder(ref, str(bad))
    msg = str(err.value)
    assert "\n" not in msg and "itm_head.weight" in msg and "text_encoder.pooler.dense.weight" in msg
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="no state dict"):
        tiny_encoder(ref, str(tmp_path / "list.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        tiny_encoder(ref, str(tmp_path / "absent.pth"))


def test_pixels_resize_inside_and_training_reaches_only_the_itc_path(tmp_path):
    """Any input size is resized inside (bicubic), so budgets stay pixel budgets; a contrastive loss on the ITC
    embeddings gives no gradient to the fusion layers or the ITM head (README: they stay as loaded)."""
    ref, ckpt = reference("albef", tmp_path)
    enc = tiny_encoder(ref, ckpt)
    small = ref["images"][:, :, ::2, ::2].contiguous()
    expected = F.interpolate(small, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        assert torch.allclose(enc.encode_image(small), enc.encode_image(expected), atol=1e-6)
    enc.train()
    img, txt = enc.encode_image(ref["images"]), enc.encode_text(ref["captions"][:3])
    logits = enc.logit_scale * img @ txt.T
    F.cross_entropy(logits, torch.arange(3)).backward()
    fusion = enc.text_encoder.encoder.layer[enc.text_encoder.fusion_layer :]
    assert all(p.grad is None for p in [*fusion.parameters(), *enc.itm_head.parameters()])
    assert enc.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 4])
def test_itm_reranking_ranks_as_albefs_evaluation(tmp_path, k):
    """Ranks after re-ranking equal those of ALBEF's ``Retrieval.py::evaluation`` score matrices rebuilt from the
    fixture's outputs of their code: in each query's ITC top-k the score is the ITM logit alone (BLIP would add the
    ITC similarity), every other entry -100. Beyond the top-k ALBEF's ranks are ties at -100 where ours keep the ITC
    order (documented), so ranks are compared up to k: every recall@K with K <= k is the same.
    Image 0 owns captions 0-1, image 1 captions 2-3, image 2 4-5."""
    from mat_lightning.eval.rerank import ItmBank, ranks
    from mat_lightning.eval.retrieval import retrieval_ranks

    ref, ckpt = reference("albef", tmp_path)
    enc = tiny_encoder(ref, ckpt, rerank_k=k)
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = ref["image_itc"] @ ref["text_itc"].T
    i2t = torch.full_like(sim, -100.0)
    for i in range(sim.shape[0]):
        top = sim[i].topk(k).indices
        i2t[i, top] = ref["itm"][i, top]
    t2i = torch.full_like(sim.T, -100.0)
    for t in range(sim.shape[1]):
        top = sim[:, t].topk(min(k, sim.shape[0])).indices
        t2i[t, top] = ref["itm"][top, t]
    expected_tr = retrieval_ranks(i2t, txt2img).tr
    expected_ir = retrieval_ranks(t2i.T.contiguous(), txt2img).ir
    bank = ItmBank(enc)
    bank.add(ref["images"], torch.arange(3), ref["captions"], txt2img)
    got = ranks(enc, ref["image_itc"], ref["text_itc"], txt2img, bank)
    assert got.tr.clamp(max=k).tolist() == expected_tr.clamp(max=k).tolist()
    assert got.ir.clamp(max=k).tolist() == expected_ir.clamp(max=k).tolist()
