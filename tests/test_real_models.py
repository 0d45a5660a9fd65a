"""Real loading code on tiny models saved to disk: HF CLIP, BLIP (ITM re-ranking), open_clip by path and local-dir,
a duck-typed third-party encoder under every attack, and offline hub names failing at once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from references import split_recall

from mat_lightning.attacks import PGD, SGA, BertAttack, CoAttack, SepAttack
from mat_lightning.errors import ConfigError
from mat_lightning.synthetic import data_args, ensure_mlm

WORDS = (
    "a an the red blue green small large circle square triangle left right of to above below and with".split()
)


def _bert_tokenizer(folder: Path):
    """A tiny WordPiece tokenizer over the tiny world's words, saved to ``folder``."""
    from transformers import BertTokenizerFast

    from mat_lightning.models.mlm import build_vocab
    from mat_lightning.synthetic import load_split

    _, caps = load_split("tiny", "train")
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(build_vocab([c for cs in caps for c in cs] + WORDS)) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def _tiny_tower(**extra) -> dict:
    """One transformer layer, 32 wide: the smallest tower HF's CLIP and BLIP configs accept."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **extra)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, tiny_world) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf_clip")
    tok = _bert_tokenizer(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_tiny_tower(
            vocab_size=len(tok),
            max_position_embeddings=40,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=_tiny_tower(image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], crop_size=32, size=32
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory, tiny_world) -> Path:
    from benchmarks.rerank_scaling import save_tiny_blip

    folder = tmp_path_factory.mktemp("blip")
    return save_tiny_blip(folder, _bert_tokenizer(folder))


def _train_and_evaluate(encoder, tmp_path) -> list[dict]:
    """One MAT training step on the tiny world, then a robust evaluation (clean + PGD) of 8 test images."""
    from mat_lightning.data.datamodule import RetrievalDataModule
    from mat_lightning.defenses import MAT
    from mat_lightning.eval.robust import RobustRetrievalEval
    from mat_lightning.module import MatModule

    defense = MAT(
        text_attack=BertAttack(mlm=str(ensure_mlm("tiny")), max_words=1),
        image_attack=PGD(eps_255=2, steps=1, step_255=1),
    )
    module = MatModule(encoder, defense, lr=1e-4)
    before = [p.detach().clone() for p in encoder.parameters() if p.requires_grad]
    dm = RetrievalDataModule(**data_args("tiny"), batch_size=8, eval_batch_size=4, max_eval_images=8)
    callback = RobustRetrievalEval(attacks=[PGD(steps=2)], progress=False)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    after = [p for p in encoder.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), (
        "the MAT step changed nothing"
    )
    trainer.test(module, datamodule=dm, verbose=False)
    assert json.loads((tmp_path / "results.json").read_text())["n_images"] == 8
    return callback.rows


# -- HF CLIP ----------------------------------------------------------------------------------------------------------


def test_hf_clip_loads_from_folder_and_matches_the_model(hf_clip_dir):
    from transformers import CLIPModel

    from mat_lightning.models.hf import HFClipEncoder

    enc = HFClipEncoder(str(hf_clip_dir)).eval()
    ref = CLIPModel.from_pretrained(hf_clip_dir).eval()
    assert enc.image_size == 32
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)  # the processor's statistics, not CLIP's defaults
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(ref.get_image_features(pixel_values=(images - mean) / std), dim=-1)
        got = enc.encode_image(images)
        text = enc.encode_text(["a red circle", "a small blue square left of a green triangle"])
    torch.testing.assert_close(got, expected)
    assert text.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    # another size is resized inside (differentiably), not rejected
    assert enc.encode_image(torch.rand(2, 3, 48, 48)).shape == (2, 16)
    torch.testing.assert_close(enc.logit_scale, ref.logit_scale.exp())


def test_hf_clip_trains_one_mat_step_and_evaluates(hf_clip_dir, tmp_path, tiny_test_split):
    """One MAT step moves both towers of an HF CLIP (MAT trains both), and the clean row is the trained model's
    recall on the 8 test images, computed by explicit loops.

    Bugs caught: a tower frozen by mistake (the old check, "some weight changed", passed with one), the evaluation
    run on the weights before the step or on images normalised twice (HF encoder + processor).
    """
    from mat_lightning.models.hf import HFClipEncoder

    encoder = HFClipEncoder(str(hf_clip_dir))
    vision = [p.detach().clone() for p in encoder.vision_parameters()]
    text = [p.detach().clone() for p in encoder.text_parameters()]
    rows = _train_and_evaluate(encoder, tmp_path)
    assert [r["attack"] for r in rows] == ["clean", "pgd"]
    assert any(not torch.equal(a, b) for a, b in zip(vision, encoder.vision_parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(text, encoder.text_parameters(), strict=True))
    images, captions = tiny_test_split
    expected = split_recall(encoder.eval(), images[:8], captions[:8])
    assert {k: rows[0][k] for k in expected} == pytest.approx(expected)


# -- BLIP -------------------------------------------------------------------------------------------------------------


def test_blip_itc_embeddings_and_itm_rerank_match_the_hf_model(blip_dir):
    from transformers import BlipForImageTextRetrieval

    from mat_lightning.eval.rerank import rerank
    from mat_lightning.models.hf import CLIP_MEAN, CLIP_STD, BlipRetrievalEncoder

    enc = BlipRetrievalEncoder(str(blip_dir), rerank_k=3).eval()
    ref = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32)
    captions = [
        "a red circle",
        "a blue square",
        "a small green triangle",
        "a large circle",
        "red and blue",
        "a",
    ]
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tok = enc.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        img, txt = enc.encode_image(images), enc.encode_text(captions)
        itc = ref(
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            pixel_values=pixels,
            use_itm_head=False,
        )
        sim = img @ txt.T
        i2t, t2i = rerank(enc, sim, dict(enumerate(enc.itm_image_states(images))), captions)
    torch.testing.assert_close(sim, itc.itm_score, atol=1e-5, rtol=1e-5)
    # an independent ITM score of pair (image 2, caption c) for c in image 2's ITC top-3
    top3 = sim[2].topk(3).indices
    with torch.no_grad():
        out = ref(
            input_ids=tok.input_ids[top3],
            attention_mask=tok.attention_mask[top3],
            pixel_values=pixels[[2, 2, 2]],
            use_itm_head=True,
        )
    torch.testing.assert_close(i2t[2, top3], out.itm_score[:, 1] + sim[2, top3], atol=1e-5, rtol=1e-5)
    _assert_reranks_within_top_k(sim, i2t, 3)
    _assert_reranks_within_top_k(sim.T, t2i.T, 3)


def _assert_reranks_within_top_k(sim, new, k):
    """Per row: the same top-k set, all of it above the rest, and the rest in its original order."""
    for row_old, row_new in zip(sim, new, strict=True):
        top_old, top_new = set(row_old.topk(k).indices.tolist()), set(row_new.topk(k).indices.tolist())
        assert top_old == top_new
        rest = [j for j in range(len(row_old)) if j not in top_old]
        assert row_new[rest].max() < row_new[list(top_old)].min()
        assert torch.equal(row_old[rest].argsort(), row_new[rest].argsort())


def test_rerank_changes_recall_only_through_the_top_k():
    """A fake re-ranker that reverses the top-k: recall@K for K >= k is unchanged, R@1 is not."""
    from mat_lightning.eval import rerank
    from mat_lightning.eval.retrieval import recall_from_ranks, retrieval_ranks

    class Reverser:  # re-scores each query's top-2 by minus its ITC similarity: the pair's order flips
        rerank_k = 2

        def itm_image_states(self, images):
            return images.flatten(1)

        def itm_scores(self, states, captions):
            return torch.zeros(len(captions))

        def rerank_score(self, itm, itc):
            return itm - itc

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(10, 8), dim=-1)
    txt2img = torch.arange(5).repeat_interleave(2)
    bank = rerank.ItmBank(Reverser())
    bank.add(torch.rand(5, 3, 4, 4), torch.arange(5), [str(i) for i in range(10)], txt2img)
    plain = recall_from_ranks(retrieval_ranks(img @ txt.T, txt2img), ks=(1, 2, 5))
    reranked = recall_from_ranks(rerank.ranks(Reverser(), img, txt, txt2img, bank), ks=(1, 2, 5))
    for key in ("tr_r2", "tr_r5", "ir_r2", "ir_r5"):
        assert reranked[key] == plain[key]
    assert (reranked["tr_r1"], reranked["ir_r1"]) != (plain["tr_r1"], plain["ir_r1"])


def test_blip_trains_one_mat_step_and_evaluates_reranked(blip_dir, tmp_path, monkeypatch):
    from mat_lightning.eval import rerank
    from mat_lightning.models.hf import BlipRetrievalEncoder

    enc = BlipRetrievalEncoder(str(blip_dir), rerank_k=4)
    calls = []
    original = rerank.rerank
    monkeypatch.setattr(rerank, "rerank", lambda *a: calls.append((a[1].shape, len(a[2]))) or original(*a))
    rows = _train_and_evaluate(enc, tmp_path)
    assert [r["attack"] for r in rows] == ["clean", "pgd"]
    # the module's clean test epoch, then the callback's clean and PGD rows: each with the states of its 8 images
    assert calls == [((8, 40), 8)] * 3


# -- open_clip from disk ----------------------------------------------------------------------------------------------


def test_open_clip_tiny_model_loads_by_path_and_by_local_dir(tmp_path):
    import open_clip

    from mat_lightning.models.encoder import CONFIG_DIR, OpenClipEncoder

    torch.manual_seed(0)
    source = OpenClipEncoder("mat-tiny", pretrained=None).eval()
    file = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), file)
    folder = tmp_path / "local"
    folder.mkdir()
    model_cfg = json.loads((CONFIG_DIR / "mat-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save(source.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    images, texts = torch.rand(2, 3, source.image_size, source.image_size), ["a red circle", "a blue square"]
    with torch.no_grad():
        expected = source.encode_image(images), source.encode_text(texts)
        for enc in (
            OpenClipEncoder("mat-tiny", pretrained=str(file)),
            OpenClipEncoder(f"local-dir:{folder}", pretrained=None),
        ):
            enc.eval()
            torch.testing.assert_close(enc.encode_image(images), expected[0])
            torch.testing.assert_close(enc.encode_text(texts), expected[1])
    assert open_clip  # imported for its side effect-free check above


# -- offline hub names ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, names",
    [
        (
            lambda: __import__("mat_lightning.models.hf", fromlist=["x"]).HFClipEncoder(
                "openai/clip-vit-base-patch16"
            ),
            ["openai/clip-vit-base-patch16", "save_pretrained"],
        ),
        (
            lambda: __import__("mat_lightning.models.hf", fromlist=["x"]).BlipRetrievalEncoder(
                "Salesforce/blip-itm-base-coco"
            ),
            ["Salesforce/blip-itm-base-coco", "save_pretrained"],
        ),
        (
            lambda: __import__("mat_lightning.attacks.bert_attack", fromlist=["x"]).load_mlm(
                "bert-base-uncased"
            ),
            ["bert-base-uncased", "save_pretrained"],
        ),
        (
            lambda: __import__("mat_lightning.models.encoder", fromlist=["x"]).OpenClipEncoder(
                "ViT-B-16", "openai"
            ),
            ["ViT-B-16/openai", "local-dir:"],
        ),
    ],
    ids=["hf_clip", "blip", "mlm", "open_clip"],
)
def test_offline_hub_name_fails_at_once_naming_the_weights(build, names, monkeypatch):
    import open_clip
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("tried to load or build the model instead of failing first")

    # failing "instantly" = before any model is built or any from_pretrained is attempted
    monkeypatch.setattr(open_clip, "create_model", no_download)
    for cls in ("CLIPModel", "BlipForImageTextRetrieval", "AutoModelForMaskedLM", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_download)
    with pytest.raises(ConfigError) as err:
        build()
    message = str(err.value)
    for name in names:
        assert name in message
    assert "HF_HUB_OFFLINE" in message


def test_local_models_maps_a_hub_name_to_a_folder(hf_clip_dir, monkeypatch):
    from mat_lightning.models import encoder
    from mat_lightning.models.hf import HFClipEncoder

    monkeypatch.setitem(encoder.LOCAL_MODELS, "openai/clip-vit-base-patch16", str(hf_clip_dir))
    assert HFClipEncoder("openai/clip-vit-base-patch16").image_size == 32


# -- the contract: a third-party encoder that is not a VLEncoder -----------------------------------------------------


class DuckEncoder:
    """DESIGN §4's contract only: encode_image(images), encode_text(texts), logit_scale, image_size; no nn.Module."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.image_size = inner.image_size

    def encode_image(self, images):
        return self._inner.encode_image(images)

    def encode_text(self, texts):
        return self._inner.encode_text(texts)

    @property
    def logit_scale(self):
        return self._inner.logit_scale


ATTACKS = {
    "pgd": lambda: PGD(steps=3),
    "pgd_kl": lambda: PGD(steps=2, objective="embedding_kl"),
    "bert_attack": lambda: BertAttack(mlm=str(ensure_mlm("tiny"))),
    "sep_attack": lambda: SepAttack(PGD(steps=2), BertAttack(mlm=str(ensure_mlm("tiny")))),
    "co_attack": lambda: CoAttack(PGD(steps=2), BertAttack(mlm=str(ensure_mlm("tiny")))),
    "sga": lambda: SGA(PGD(steps=2), BertAttack(mlm=str(ensure_mlm("tiny")))),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_runs_on_a_duck_typed_encoder_exactly_as_on_ours(name, tiny_encoder, tiny_test_split):
    images = tiny_test_split[0][:3].float() / 255
    captions = [c for caps in tiny_test_split[1][:3] for c in caps[:2]]
    txt2img = torch.arange(3).repeat_interleave(2)
    tiny_encoder.eval()
    duck = DuckEncoder(tiny_encoder)
    ours = ATTACKS[name]()(tiny_encoder, images, captions, txt2img)
    theirs = ATTACKS[name]()(duck, images, captions, txt2img)
    # The same algorithm; gradients through frozen (ours) and unfrozen (duck) weights may differ in the last bits,
    # which flips the sign step of a handful of pixels whose gradient is ~0.
    same = (theirs.images - ours.images).abs() <= 1e-5
    assert same.float().mean() > 0.99
    assert theirs.captions == ours.captions


def test_fare_objective_on_an_encoder_without_normalize_says_what_is_missing(tiny_encoder):
    from mat_lightning.attacks.objectives import Guidance, embedding_l2

    duck = DuckEncoder(tiny_encoder)
    images = torch.rand(2, 3, duck.image_size, duck.image_size)
    with pytest.raises(ConfigError, match="no 'normalize' keyword"):
        PGD(steps=1).perturb(
            duck, images, embedding_l2, Guidance(reference_emb=torch.zeros(2, 8)), normalize=False
        )


@pytest.mark.slow
def test_blip_zeroshot_experiment_runs_through_the_cli_with_a_local_blip(blip_dir, tmp_path):
    """The BLIP experiment file, on the tiny world, with a local tiny BLIP instead of the hub name (re-ranked)."""
    from mat_lightning.cli import main

    repo = Path(__file__).resolve().parents[1]
    main(
        [
            "test",
            "--config",
            str(repo / "experiments" / "flickr30k_blip_zeroshot.yaml"),
            "--config",
            str(repo / "conf" / "overlay" / "tiny.yaml"),
            "--model.encoder=mat_lightning.models.hf.BlipRetrievalEncoder",
            f"--model.encoder.init_args.source={blip_dir}",
            "--model.encoder.init_args.rerank_k=4",
            "--run_root",
            str(tmp_path),
        ]
    )
    results = json.loads(next(tmp_path.glob("*/*/results.json")).read_text())
    assert results["model"] == f"{blip_dir}/hf"
    assert [r["attack"] for r in results["rows"]] == [
        "clean",
        "pgd",
        "bert_attack",
        "sep_attack",
        "co_attack",
        "sga",
    ]
