"""BERT-Attack's candidate store (mat_lightning/attacks/store.py): the same adversarial captions with and without it,
in default and reference mode, on real Flickr30K captions; the store really replaces the MLM and the tokenizer;
cache keys, atomic files and bad stores."""

from __future__ import annotations

import pytest
import torch

from mat_lightning.attacks import PGD, SGA, BertAttack
from mat_lightning.attacks import bert_attack as ba
from mat_lightning.attacks.reference import pre_caption
from mat_lightning.attacks.store import CandidateStore, ensure_store
from mat_lightning.errors import ConfigError


def _captions(flickr_mlm, mode: str, n: int = 160) -> list[str]:
    _, captions = flickr_mlm
    sample = captions[:n]
    return [pre_caption(c) for c in sample] if mode == "reference" else sample


def _attack(folder, mode: str, **kwargs) -> BertAttack:
    kwargs = {"top_k": 10, "mlm_batch_size": 32, **kwargs}
    return BertAttack(mlm=str(folder), reference=mode == "reference", **kwargs)


def _guides(encoder, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, encoder.image_size, encoder.image_size, generator=g)
    with torch.no_grad():
        return encoder.encode_image(images), torch.arange(n)


class _NoMLM:
    """Patches the MLM passes to fail: with a store that holds every caption the attack must not run them."""

    def __enter__(self):
        self.saved = ba._mlm_topk, ba._perplexity

        def fail(*a, **k):
            raise AssertionError("the masked LM ran although the store holds the captions")

        ba._mlm_topk = ba._perplexity = fail

    def __exit__(self, *exc):
        ba._mlm_topk, ba._perplexity = self.saved


@pytest.mark.parametrize("mode", ["default", "reference"])
@pytest.mark.parametrize("max_words", [1, 2])
def test_identical_adversarial_captions_with_and_without_the_store(
    flickr_mlm, tiny_encoder, tmp_path, mode, max_words
):
    """Catches a store that differs from the on-the-fly computation: other substitutes (a filter, the threshold, the
    perplexity order), other [UNK] variants, ids of other texts (reference mode's text_view forgotten), or a
    second-round candidate read from the stored one-word changes of the *original* caption."""
    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, mode)
    image_emb, t2i = _guides(tiny_encoder, len(captions))
    plain = _attack(folder, mode, max_words=max_words)
    expected = plain.perturb(tiny_encoder, captions, t2i, "image_cosine", image_emb)

    stored = _attack(folder, mode, max_words=max_words)
    store = ensure_store(stored, captions, tiny_encoder, folder=tmp_path, progress=False)
    assert store is not None and store.has_ids and len(store) == len(set(captions))
    stored.attach_store(store)
    tokenised: list[str] = []
    tokenize = tiny_encoder.tokenize
    tiny_encoder.tokenize = lambda texts: (tokenised.extend(texts), tokenize(texts))[1]
    with _NoMLM():
        got = stored.perturb(tiny_encoder, captions, t2i, "image_cosine", image_emb)
    assert got == expected
    assert sum(a != b for a, b in zip(captions, got, strict=True)) > len(captions) // 2  # the attack did work
    if max_words == 1:  # every text the search encodes came from the store's ids
        assert tokenised == []
    else:  # only second-round candidates (of already changed captions) are tokenised
        assert 0 < len(tokenised)


@pytest.mark.parametrize("mode", ["default", "reference"])
def test_sga_identical_with_the_store(flickr_mlm, tiny_encoder, tmp_path, mode):
    """SGA's two text passes read the store as BERT-Attack alone does: same adversarial images and captions."""
    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, mode, n=24)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(len(captions), 3, tiny_encoder.image_size, tiny_encoder.image_size, generator=g)
    t2i = torch.arange(len(captions))

    def sga():
        return SGA(
            PGD(eps_255=2, steps=2, step_255=1), _attack(folder, "default"), reference=mode == "reference"
        )

    plain, stored = sga(), sga()
    expected = plain(tiny_encoder, images, captions, t2i)
    stored.text_attack.attach_store(
        ensure_store(stored.text_attack, captions, tiny_encoder, folder=tmp_path, progress=False)
    )
    with _NoMLM():
        got = stored(tiny_encoder, images, captions, t2i)
    assert got.captions == expected.captions
    assert torch.equal(got.images, expected.images)


class _DuckEncoder:
    """DESIGN §4's minimal contract only (no token-id path): the store then holds substitutes, not ids."""

    def __init__(self, inner):
        self.inner, self.image_size, self.logit_scale = inner, inner.image_size, inner.logit_scale

    def encode_image(self, images):
        return self.inner.encode_image(images)

    def encode_text(self, texts):
        return self.inner.encode_text(texts)


def test_store_without_token_ids_for_a_minimal_encoder(flickr_mlm, tiny_encoder, tmp_path):
    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, "default", n=60)
    duck = _DuckEncoder(tiny_encoder)
    image_emb, t2i = _guides(tiny_encoder, len(captions))
    expected = _attack(folder, "default").perturb(duck, captions, t2i, "image_cosine", image_emb)
    attack = _attack(folder, "default")
    store = ensure_store(attack, captions, duck, folder=tmp_path, progress=False)
    assert not store.has_ids
    attack.attach_store(store)
    with _NoMLM():
        assert attack.perturb(duck, captions, t2i, "image_cosine", image_emb) == expected


def test_captions_the_store_lacks_are_prepared_on_the_fly(flickr_mlm, tiny_encoder, tmp_path):
    """A batch mixing stored and new captions (MAT+1:N's random EDA edits are never stored) gets the same result."""
    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, "default", n=40)
    image_emb, t2i = _guides(tiny_encoder, len(captions))
    expected = _attack(folder, "default").perturb(tiny_encoder, captions, t2i, "image_cosine", image_emb)
    attack = _attack(folder, "default")
    attack.attach_store(ensure_store(attack, captions[::2], tiny_encoder, folder=tmp_path, progress=False))
    assert attack.perturb(tiny_encoder, captions, t2i, "image_cosine", image_emb) == expected


def test_store_key_reuse_and_settings(flickr_mlm, tiny_encoder, tmp_path):
    """The same inputs open the built store (no second build); other settings or captions get another store;
    a store built for other settings is refused."""
    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, "default", n=20)
    first = ensure_store(_attack(folder, "default"), captions, tiny_encoder, folder=tmp_path, progress=False)
    again = ensure_store(_attack(folder, "default"), list(reversed(captions)), tiny_encoder, folder=tmp_path)
    assert again.folder == first.folder and again.meta == first.meta
    other = ensure_store(_attack(folder, "default", top_k=5), captions, tiny_encoder, folder=tmp_path)
    fewer = ensure_store(_attack(folder, "default"), captions[:10], tiny_encoder, folder=tmp_path)
    assert len({first.folder, other.folder, fewer.folder}) == 3
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    )  # no temporary folder left
    with pytest.raises(ConfigError, match="other attack settings"):
        _attack(folder, "default", top_k=5).attach_store(first)
    # max_words and the objective do not change what is stored
    assert (
        ensure_store(
            _attack(folder, "default", max_words=3, objective="embedding_kl"),
            captions,
            tiny_encoder,
            folder=tmp_path,
        ).folder
        == first.folder
    )
    # an in-memory MLM has no identity to key a cache by
    model, tok = ba.load_mlm(str(folder))
    assert ensure_store(BertAttack.from_mlm(model, tok), captions, tiny_encoder, folder=tmp_path) is None


def test_a_broken_store_names_its_folder(flickr_mlm, tiny_encoder, tmp_path):
    folder, _ = flickr_mlm
    store = ensure_store(
        _attack(folder, "default"),
        _captions(flickr_mlm, "default", n=8),
        tiny_encoder,
        folder=tmp_path,
        progress=False,
    )
    (store.folder / "var_ptr.npy").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=str(store.folder)):
        CandidateStore(store.folder)


def test_store_pickles_as_its_folder(flickr_mlm, tiny_encoder, tmp_path):
    """DataLoader workers receive the store by pickling: they re-open the files, not copy the arrays."""
    import pickle

    folder, _ = flickr_mlm
    captions = _captions(flickr_mlm, "default", n=8)
    store = ensure_store(_attack(folder, "default"), captions, tiny_encoder, folder=tmp_path, progress=False)
    blob = pickle.dumps(store)
    assert len(blob) < 1000
    copy = pickle.loads(blob)
    plan, again = store.plan(captions), copy.plan(captions)
    assert plan.candidates == again.candidates and torch.equal(plan.ids, again.ids)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_reads_the_store_in_the_loader(tiny_clip_path, tiny_mlm, tmp_path, monkeypatch, num_workers):
    """MAT training with the store (looked up by the DataLoader, in a worker process with num_workers=1) ends in the
    same weights as without it, every caption is found, and the masked LM never runs during training.

    Bugs caught: plans that do not reach the training step (hits < 1 or the MLM running), plans of another batch
    (other weights), a store that does not pickle to a worker."""
    import lightning as L

    from mat_lightning.data.datamodule import RetrievalDataModule
    from mat_lightning.defenses.mat import MAT
    from mat_lightning.models.encoder import OpenClipEncoder
    from mat_lightning.module import MatModule
    from mat_lightning.synthetic import data_args

    monkeypatch.setenv("MAT_CACHE_DIR", str(tmp_path / "cache"))

    class NoMLMWhileTraining(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.ctx = _NoMLM() if pl_module.candidate_store else None
            if self.ctx:
                self.ctx.__enter__()

        def on_train_end(self, trainer, pl_module):
            if self.ctx:
                self.ctx.__exit__(None, None, None)

    def fit(candidate_store: bool):
        torch.manual_seed(0)
        encoder = OpenClipEncoder("mat-tiny", pretrained=str(tiny_clip_path))
        defense = MAT(BertAttack(mlm=tiny_mlm, max_words=1), PGD(eps_255=2, steps=1, step_255=2))
        module = MatModule(encoder, defense, lr=1e-3, candidate_store=candidate_store)
        dm = RetrievalDataModule(
            **data_args("tiny"),
            batch_size=16,
            captions_per_image=2,
            max_eval_images=16,
            num_workers=num_workers,
        )
        trainer = L.Trainer(
            max_steps=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            default_root_dir=tmp_path,
            callbacks=[NoMLMWhileTraining()],
        )
        L.seed_everything(0, verbose=False)
        trainer.fit(module, dm)
        return encoder, trainer.callback_metrics

    with_store, metrics = fit(True)
    without, _ = fit(False)
    assert metrics["train/caption_store_hits"].item() == 1.0
    assert (tmp_path / "cache" / "candidate-stores").is_dir()
    for a, b in zip(with_store.parameters(), without.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mat_prepare_attacks_builds_what_the_run_reads(tmp_path, capsys, tiny_world):
    """`mat prepare-attacks` on an experiment builds the training text attack's store of the train captions and
    the evaluation suite's stores of the test captions, prints a table of them on stdout, leaves no run folder; a
    second call opens them (unchanged); the run's own setup then finds the same store (no build).

    Bugs caught: a store keyed on something the run resolves differently (another MLM path, caption cleaning,
    settings), so that the run would build again; a run folder left behind."""
    from mat_lightning.attacks.store import default_folder
    from mat_lightning.cli import main

    args = [
        "prepare-attacks",
        "--config",
        "experiments/synthetic_mat.yaml",
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--data.max_eval_images=16",
        f"--run_root={tmp_path / 'runs'}",
    ]
    main(args)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["split", "for", "captions", "subst.", "MB", "store"]
    assert lines[1].split()[:2] == ["train", "MAT"]
    assert {line.split()[1] for line in lines[2:]} >= {"bert_attack"}
    assert all(len(line) <= 80 for line in lines)
    keys = [line.split()[-1] for line in lines[1:]]
    folders = [default_folder() / k for k in keys]
    assert all((f / "meta.json").is_file() for f in folders)
    stamps = [(f / "meta.json").stat().st_mtime_ns for f in folders]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml"))
    main(args)
    assert capsys.readouterr().out == out
    assert [(f / "meta.json").stat().st_mtime_ns for f in folders] == stamps
    n_train = int(lines[1].split()[2])
    assert n_train > 1000  # tiny world: 384 train images x 5 captions, deduplicated
