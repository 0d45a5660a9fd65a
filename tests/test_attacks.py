"""The attack contract over every registered attack, and each attack's specific behaviour."""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mat_lightning.attacks as A
from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.errors import ConfigError
from mat_lightning.eval.retrieval import recall_at_k
from mat_lightning.synthetic import ensure_mlm


def tiny_mlm() -> str:
    """The tiny world's masked LM folder (what ``mlm: synthetic:tiny`` resolves to)."""
    return str(ensure_mlm("tiny"))


def n_changed_words(before: str, after: str) -> int:
    """A lower bound on the words of ``before`` replaced in ``after`` (words off a longest common subsequence); a
    substitute may be several words (the references' multi-sub-word candidates keep their spaces)."""
    b, a = before.split(" "), after.split(" ")
    lcs = [0] * (len(a) + 1)
    for x in b:
        prev = 0
        for j, y in enumerate(a):
            prev, lcs[j + 1] = lcs[j + 1], prev + 1 if x == y else max(lcs[j + 1], lcs[j])
    return len(b) - lcs[-1]


def one_substitution(before: str, after: str) -> tuple[str, str] | None:
    """(old word, new text) if ``after`` is ``before`` with exactly one word replaced by a non-empty text."""
    b, a = before.split(" "), after.split(" ")
    for j in range(len(b)):
        tail = len(a) - (len(b) - j - 1)
        if a[:j] == b[:j] and a[tail:] == b[j + 1 :] and tail > j and a[j:tail] != [b[j]]:
            return b[j], " ".join(a[j:tail])
    return None


def make(cls_name: str, **kw):
    """A small-budget instance of each registered attack, wired to the tiny world's MLM."""
    bert = lambda: BertAttack(mlm=tiny_mlm(), top_k=5)  # noqa: E731
    return {
        "PGD": lambda: A.PGD(eps_255=2, steps=5, step_255=0.5, **kw),
        "BertAttack": lambda: BertAttack(mlm=tiny_mlm(), top_k=5, **kw),
        "SepAttack": lambda: A.SepAttack(A.PGD(eps_255=2, steps=5, step_255=0.5), bert(), **kw),
        "CoAttack": lambda: A.CoAttack(A.PGD(eps_255=2, steps=5, step_255=0.5), bert(), **kw),
        "SGA": lambda: A.SGA(A.PGD(eps_255=2, steps=5, step_255=0.5), bert(), **kw),
        "TorchattacksAttack": lambda: A.TorchattacksAttack("PGD", 2, {"alpha_255": 0.5, "steps": 5}, **kw),
        "TextAttackWordSwap": lambda: A.TextAttackWordSwap("WordSwapNeighboringCharacterSwap", top_k=5, **kw),
    }[cls_name]()


CONCRETE = [
    n for n in A.__all__ if n not in ("Attack", "AttackResult", "TextAttackCandidates", "ThesaurusCandidates")
]


@pytest.fixture(scope="module")
def data(tiny_test_split):
    images, caps = tiny_test_split
    x = images[:16].float() / 255
    captions = [c for cs in caps[:16] for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(caps[:16]) for _ in cs])
    return x, captions, txt2img


def recall(encoder, images, captions, txt2img):
    with torch.no_grad():
        return recall_at_k(encoder.encode_image(images) @ encoder.encode_text(captions).T, txt2img)


@pytest.mark.parametrize("name", CONCRETE)
def test_contract(name, tiny_encoder, data):
    x, captions, txt2img = data
    attack = make(name)
    # state the attack must leave as it found it: train mode, a frozen parameter, an existing .grad
    tiny_encoder.train()
    frozen = next(tiny_encoder.text_parameters())
    frozen.requires_grad_(False)
    probe = next(tiny_encoder.vision_parameters())
    probe.grad = torch.full_like(probe, 0.5)
    flags = [p.requires_grad for p in tiny_encoder.parameters()]
    x_before = x.clone()

    out = attack(tiny_encoder, x, captions, txt2img)

    assert tiny_encoder.training
    assert [p.requires_grad for p in tiny_encoder.parameters()] == flags
    assert torch.equal(probe.grad, torch.full_like(probe, 0.5))
    assert all(p.grad is None for p in tiny_encoder.parameters() if p is not probe)
    assert torch.equal(x, x_before)  # inputs untouched
    assert out.images.shape == x.shape and len(out.captions) == len(captions)
    assert out.images.min() >= 0 and out.images.max() <= 1
    eps = attack.eps_255
    if eps is not None:
        assert (out.images - x).abs().max() <= eps / 255 + 1e-6
    else:
        assert torch.equal(out.images, x)
    max_words = getattr(getattr(attack, "text_attack", attack), "max_words", None)
    for before, after in zip(captions, out.captions, strict=True):
        changed = n_changed_words(before, after)
        if attack.modality == "image":
            assert before == after
        else:
            assert changed <= max_words
    # same seed, same output; the clean recall drops
    again = make(name)(tiny_encoder, x, captions, txt2img)
    assert torch.equal(again.images, out.images) and again.captions == out.captions
    clean, adv = (
        recall(tiny_encoder, x, captions, txt2img),
        recall(tiny_encoder, out.images, out.captions, txt2img),
    )
    assert adv["r_mean"] < clean["r_mean"], (clean, adv)


def test_multimodal_at_least_as_strong_as_its_unimodal_parts(tiny_encoder, data):
    """Each multimodal attack vs. its own image and text parts run alone with the same budgets and objectives."""
    x, captions, txt2img = data

    def r_mean(attack):
        out = attack(tiny_encoder, x, captions, txt2img)
        return recall(tiny_encoder, out.images, out.captions, txt2img)["r_mean"]

    pgd = lambda objective: A.PGD(eps_255=2, steps=5, step_255=0.5, objective=objective)  # noqa: E731
    bert = lambda objective: BertAttack(mlm=tiny_mlm(), top_k=5, objective=objective)  # noqa: E731
    cases = {
        "sep_attack": (
            A.SepAttack(pgd("contrastive"), bert("image_cosine")),
            pgd("contrastive"),
            bert("image_cosine"),
        ),
        "co_attack": (
            A.CoAttack(pgd("contrastive"), bert("image_cosine")),
            pgd("embedding_kl"),
            bert("embedding_kl"),
        ),
        "sga": (A.SGA(pgd("contrastive"), bert("image_cosine")), pgd("caption_cosine"), bert("image_cosine")),
    }
    for name, (multimodal, image_part, text_part) in cases.items():
        both, image_only, text_only = r_mean(multimodal), r_mean(image_part), r_mean(text_part)
        assert both <= min(image_only, text_only) + 1e-6, (name, both, image_only, text_only)


def test_pgd_cross_entropy_equals_torchattacks(tiny_encoder, data):
    """Our PGD with the cross-entropy objective against torchattacks' PGD on a classifier built here: one class per
    image, its weight the normalised mean of the image's 5 caption embeddings, logits scaled by the model's
    temperature, labels 0..15 (not our ``caption_prototypes``/guidance).

    Bugs caught: prototypes of the wrong captions (misaligned txt2img) or unnormalised, the temperature left out,
    a step that is not sign(grad), projection in the wrong order, another random start.
    """
    torchattacks = pytest.importorskip("torchattacks")
    x, captions, txt2img = data
    ours = A.PGD(eps_255=4, steps=7, step_255=1, objective="cross_entropy", seed=11)
    tiny_encoder.eval()
    with torch.no_grad():
        text = tiny_encoder.encode_text(captions)
        class_emb = torch.stack([F.normalize(text[5 * i : 5 * i + 5].mean(0), dim=0) for i in range(16)])
    labels = torch.arange(16)
    scale = tiny_encoder.logit_scale.detach()

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = tiny_encoder

        def forward(self, images):
            return scale * self.encoder.encode_image(images) @ class_emb.T

    torch.manual_seed(11)  # torchattacks draws its random start from the global generator
    theirs = torchattacks.PGD(Classifier(), eps=4 / 255, alpha=1 / 255, steps=7, random_start=True)(x, labels)
    mine = ours(tiny_encoder, x, captions, txt2img).images
    # The classifier here is built apart from ours, so its logits differ from our objective's in the last float bit:
    # a sign-gradient step may flip on a pixel whose gradient is ~0 (seen: 1 pixel of 196,608, by 1/255).
    differ = (mine - theirs).abs() > 1e-6
    assert differ.float().mean() <= 1e-4, int(differ.sum())


def test_pgd_l2_and_grid(tiny_encoder, data):
    x, captions, txt2img = data
    l2 = A.PGD(eps_255=30, steps=4, step_255=10, norm="l2")
    out = l2(tiny_encoder, x, captions, txt2img).images
    assert ((out - x).flatten(1).norm(dim=1) <= 30 / 255 + 1e-5).all()
    wide = A.PGD(eps_255=2, step_255=0.5).with_eps(8)
    assert wide.eps_255 == 8 and wide.step_255 == 2.0
    with pytest.raises(ConfigError, match="objective='nope'"):
        A.PGD(objective="nope")


def test_eps_grid_of_multimodal_attacks_changes_only_the_image_budget():
    sga = A.SGA(A.PGD(eps_255=2), BertAttack(mlm=tiny_mlm()))
    wide = sga.with_eps(4)
    assert wide.eps_255 == 4 and sga.eps_255 == 2 and wide.text_attack.mlm == tiny_mlm()
    assert BertAttack(mlm=tiny_mlm()).with_eps(8).eps_255 is None


# -- BERT-Attack specifics ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def position_mlm(tmp_path_factory):
    """A hand-built MLM: at every position it predicts 'x<token at that position>' first, then the token itself.

    So the substitute proposed for a word tells which position it was read from.
    """
    from transformers import BertTokenizerFast

    words = ["alpha", "bravo", "charlie", "delta"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"x{w}" for w in words), "xcls", "xsep"]
    folder = tmp_path_factory.mktemp("position_mlm")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    target = torch.arange(len(vocab))
    for w in words:
        target[tok.convert_tokens_to_ids(w)] = tok.convert_tokens_to_ids(f"x{w}")
    target[tok.cls_token_id] = tok.convert_tokens_to_ids("xcls")
    target[tok.sep_token_id] = tok.convert_tokens_to_ids("xsep")

    class PositionMLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, len(vocab))
            logits.scatter_(2, target[input_ids].unsqueeze(-1), 10.0)
            logits.scatter_(2, input_ids.unsqueeze(-1), 5.0)
            return types.SimpleNamespace(logits=logits)

    return PositionMLM(), tok


@pytest.mark.parametrize("legacy", [False, True])
def test_candidates_come_from_the_word_position(position_mlm, tiny_encoder, legacy):
    model, tok = position_mlm
    attack = BertAttack.from_mlm(
        model, tok, top_k=2, max_words=1, objective="embedding_kl", legacy_offset=legacy, stop_words=[]
    )
    caption = "alpha bravo charlie delta"
    words = caption.split()
    (adv,) = attack.perturb(tiny_encoder, [caption], torch.tensor([0]), "embedding_kl")
    changed = [(j, a) for j, (w, a) in enumerate(zip(words, adv.split(), strict=True)) if w != a]
    assert len(changed) == 1
    j, substitute = changed[0]
    if not legacy:
        assert substitute == f"x{words[j]}"  # read at the word's own position ([CLS] shift applied)
    else:  # Co-Attack/SGA off-by-one: read at the previous token, [CLS] for the first word
        assert substitute == ("xcls" if j == 0 else f"x{words[j - 1]}")


def test_candidates_skip_stop_words_subwords_and_the_word_itself(position_mlm, tiny_encoder):
    model, tok = position_mlm
    attack = BertAttack.from_mlm(model, tok, top_k=2, max_words=4, stop_words=["charlie", "xbravo"])
    (adv,) = attack.perturb(tiny_encoder, ["alpha bravo charlie delta"], torch.tensor([0]), "embedding_kl")
    adv_words = adv.split()
    assert adv_words[2] == "charlie"  # a stop word is never replaced
    assert adv_words[1] == "bravo"  # its only candidate is a stop word; the word itself is never a candidate
    assert all("##" not in w and "[" not in w for w in adv_words)


def test_bert_attack_on_real_captions(flickr_mlm, tiny_encoder):
    folder, captions = flickr_mlm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    sample = captions[:200]
    assert any(len(tok.tokenize(w)) > 1 for c in sample for w in c.split())  # the BPE path is exercised
    attack = BertAttack(mlm=str(folder), top_k=10, max_words=1, objective="embedding_kl")
    adv = attack.perturb(tiny_encoder, sample, torch.arange(len(sample)), "embedding_kl")
    n_changed = 0
    for before, after in zip(sample, adv, strict=True):
        if before == after:
            continue
        old, new = one_substitution(before, after)
        assert old.lower() not in attack.stop_words and "##" not in new and new.lower() != old.lower()
        n_changed += 1
    assert n_changed > len(sample) // 2  # most captions get attacked


def test_missing_mlm_is_a_clear_error(tiny_encoder, tmp_path):
    attack = BertAttack(mlm=str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="could not load the masked LM"):
        attack(tiny_encoder, torch.rand(1, 3, 64, 64), ["a red circle"], torch.tensor([0]))


# -- adapters -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FGSM", "MIFGSM", "APGD"])
def test_torchattacks_adapter_runs_any_attack(name, tiny_encoder, data):
    pytest.importorskip("torchattacks")
    x, captions, txt2img = data
    kwargs = {"steps": 3} if name != "FGSM" else {}
    out = A.TorchattacksAttack(name, eps_255=2, kwargs=kwargs)(tiny_encoder, x, captions, txt2img)
    assert (out.images - x).abs().max() <= 2 / 255 + 1e-6
    assert (
        recall(tiny_encoder, out.images, captions, txt2img)["r_mean"]
        < recall(tiny_encoder, x, captions, txt2img)["r_mean"]
    )


def test_adapters_explain_a_missing_package(monkeypatch, tiny_encoder, data):
    import sys

    x, captions, txt2img = data
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ConfigError, match="needs `torchattacks`"):
        A.TorchattacksAttack("PGD")(tiny_encoder, x, captions, txt2img)


def test_textattack_transformation_as_candidate_generator():
    gen = A.TextAttackCandidates("WordSwapQWERTY")
    cands = gen.candidates(["a", "crimson", "disc"], 1, 5)
    assert 0 < len(cands) <= 5
    assert all(c != "crimson" and len(c) == len("crimson") for c in cands)


# -- synonym-only substitution and row names ----------------------------------------------------------------------------


def write_thesaurus(path, table: dict) -> str:
    path.write_text(json.dumps(table))
    return str(path)


def test_thesaurus_candidates_are_only_the_synonyms(tmp_path):
    from mat_lightning.errors import DataError

    gen = A.ThesaurusCandidates(write_thesaurus(tmp_path / "t.json", {"red": ["crimson", "scarlet", "ruby"]}))
    assert gen.candidates(["a", "red", "disc"], 1, 10) == ["crimson", "scarlet", "ruby"]
    assert gen.candidates(["a", "red", "disc"], 1, 2) == ["crimson", "scarlet"]  # at most k
    assert gen.candidates(["A", "Red,", "disc"], 1, 10) == [
        "Crimson,",
        "Scarlet,",
        "Ruby,",
    ]  # case, punctuation
    assert gen.candidates(["a", "red", "disc"], 2, 10) == []  # a word it does not know is left alone
    assert gen.candidates(["a", "...", "disc"], 1, 10) == []
    with pytest.raises(DataError, match="ThesaurusCandidates thesaurus file not found"):
        A.ThesaurusCandidates(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="expected an object"):
        A.ThesaurusCandidates(write_thesaurus(tmp_path / "bad.json", {"red": "crimson"}))
    with pytest.raises(ConfigError, match="resolved to paths by the mat CLI"):
        A.ThesaurusCandidates("synthetic")


def test_synonym_attack_changes_words_only_into_their_synonyms(flickr_test_json, tiny_encoder, tmp_path):
    from mat_lightning.data.formats import read_annotations

    table = {
        "man": ["guy", "gentleman"],
        "woman": ["lady"],
        "people": ["persons", "folks"],
        "shirt": ["top", "tee"],
        "young": ["little", "youthful"],
        "girl": ["lass"],
        "standing": ["upright"],
        "sitting": ["seated"],
        "playing": ["performing"],
        "holding": ["gripping", "carrying"],
        "outside": ["outdoors"],
        "boy": ["lad"],
        "men": ["guys"],
        "women": ["ladies"],
    }
    synonyms = {w: set(s) for w, s in table.items()}
    captions = [c for r in read_annotations(flickr_test_json, "/")[:40] for c in r.captions]
    attack = BertAttack(
        candidate_generator=A.ThesaurusCandidates(write_thesaurus(tmp_path / "t.json", table)), max_words=3
    )
    adv = attack.perturb(tiny_encoder, captions, torch.arange(len(captions)), "embedding_kl")
    changed = 0
    for before, after in zip(captions, adv, strict=True):
        b, a = before.split(" "), after.split(" ")
        assert len(a) == len(b)  # one word for one word
        diffs = [(x, y) for x, y in zip(b, a, strict=True) if x != y]
        assert len(diffs) <= 3
        for x, y in diffs:
            core = x.strip(".,").lower()
            assert y.strip(".,").lower() in synonyms[core], (x, y, before)
        changed += bool(diffs)
    assert changed > len(captions) // 2  # most captions hold a word of the thesaurus and get attacked


def test_every_attack_takes_a_row_name():
    for cls in CONCRETE:
        default = make(cls)
        named = make(cls, name="my_row")
        assert named.name == "my_row" and default.name != "my_row" and make(cls).name == default.name
        assert named.clone().name == "my_row" and named.with_eps(4).name == "my_row"
    with pytest.raises(ConfigError, match="BertAttack name='two words'"):
        BertAttack(mlm=tiny_mlm(), name="two words")


def test_the_suite_parses_with_distinct_names_and_records_them(tiny_world):
    """conf/attack/synthetic_suite.yaml, as the mat CLI builds it: names distinct, the extra rows as configured."""
    from jsonargparse import ArgumentParser

    from mat_lightning.eval.robust import RobustRetrievalEval, attack_config, check_distinct_names
    from mat_lightning.main import SUITE, eval_attacks, suite_names
    from mat_lightning.synthetic import ensure_thesaurus, resolve_config

    parser = ArgumentParser()
    parser.add_argument("--data.dataset", default="synthetic")
    parser.add_argument("--data.world", default="tiny")
    parser.add_argument("--data.annotations", default=None)
    parser.add_class_arguments(RobustRetrievalEval, "robust_eval")
    cfg = resolve_config(parser.parse_args([f"--robust_eval={SUITE}"]))
    attacks = parser.instantiate(cfg).robust_eval.attacks
    names = [a.name for a in attacks]
    expected = [
        "pgd",
        "bert_attack",
        "bert_attack_synonym",
        "bert_attack_strong",
        "sep_attack",
        "co_attack",
        "sga",
    ]
    assert names == expected == suite_names()
    check_distinct_names(attacks)
    synonym, strong = attacks[2], attacks[3]
    assert isinstance(synonym.candidate_generator, A.ThesaurusCandidates) and synonym.max_words == 3
    assert synonym.candidate_generator.thesaurus == str(ensure_thesaurus("tiny"))
    assert (strong.top_k, strong.max_words, strong.objective, strong.mlm) == (
        30,
        2,
        "image_cosine",
        tiny_mlm(),
    )
    assert (attacks[1].top_k, attacks[1].max_words) == (10, 1)  # the papers' row is unchanged
    recorded = attack_config(synonym)
    assert recorded["name"] == "bert_attack_synonym"
    # the file by name and content (sha256sum's first 16 digits), not its cache path; no MLM setting recorded
    thesaurus = Path(ensure_thesaurus("tiny")).resolve()
    digest = hashlib.sha256(thesaurus.read_bytes()).hexdigest()[:16]
    assert recorded["candidate_generator"] == {
        "class": "ThesaurusCandidates",
        "thesaurus": f"{thesaurus.name} sha256:{digest}",
    }
    assert not set(recorded) & {"mlm", "threshold_pred_score", "bpe_top", "max_subwords", "legacy_offset"}
    assert attack_config(strong)["mlm"].startswith(Path(tiny_mlm()).name + " sha256:")
    assert "name" not in attack_config(attacks[1])  # rows without a name record what they always did
    # mat eval picks rows by name, the BertAttack rows included
    picked = eval_attacks("bert_attack_synonym,bert_attack,bert_attack_strong", "synthetic")
    assert [p["init_args"].get("name") for p in picked] == ["bert_attack_synonym", None, "bert_attack_strong"]


@pytest.mark.parametrize("name", ["PGD", "SepAttack", "CoAttack", "SGA", "TorchattacksAttack"])
def test_seed_changes_the_randomised_attacks(name, tiny_encoder, data):
    x, captions, txt2img = data
    a = make(name)(tiny_encoder, x, captions, txt2img).images
    b = make(name, seed=1)(tiny_encoder, x, captions, txt2img).images
    assert not torch.equal(a, b)


def test_image_objectives_against_hand_loops():
    from mat_lightning.attacks.objectives import Guidance, caption_cosine, embedding_kl

    g = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt2img = torch.tensor([0, 0, 0, 1, 2, 2])
    per_image = [sum(float(emb[i] @ txt[t]) for t in range(6) if txt2img[t] == i) for i in range(3)]
    assert caption_cosine(emb, Guidance(txt2img=txt2img, text_emb=txt)).item() == pytest.approx(
        -sum(per_image) / 3
    )
    clean = torch.nn.functional.normalize(torch.randn(3, 5, generator=g), dim=-1)
    p, q = (
        clean.softmax(-1),
        emb.softmax(-1),
    )  # Co-Attack: KLDivLoss(log_softmax(adv), softmax(clean)), batchmean
    expected = float((p * (p.log() - q.log())).sum() / 3)
    assert embedding_kl(emb, Guidance(clean_emb=clean)).item() == pytest.approx(expected, rel=1e-5)


def test_co_attack_objective_and_sga_guidance_order(tiny_encoder, data, monkeypatch):
    x, captions, txt2img = data
    x, captions, txt2img = (
        x[:4],
        [c for c, i in zip(captions, txt2img.tolist(), strict=True) if i < 4],
        txt2img[txt2img < 4],
    )
    # Co-Attack: capture the image objective and check it against the formula on fixed embeddings.
    co = A.CoAttack(A.PGD(eps_255=2, steps=1), BertAttack(mlm=tiny_mlm(), top_k=3), alpha=3.0)
    seen = {}

    def spy_perturb(encoder, images, objective, guidance, normalize=True, views=None):
        seen.update(objective=objective, guidance=guidance)
        return images

    monkeypatch.setattr(co.image_attack, "perturb", spy_perturb)
    co(tiny_encoder, x, captions, txt2img)
    g = seen["guidance"]
    adv = torch.nn.functional.normalize(torch.randn(4, g.clean_emb.shape[1]), dim=-1)

    def kl(a, target):
        p, q = target.softmax(-1), a.softmax(-1)
        return (p * (p.log() - q.log())).sum() / a.shape[0]

    expected = kl(adv, g.clean_emb) + 3.0 * kl(adv[g.txt2img], g.text_emb)
    torch.testing.assert_close(seen["objective"](adv, g), expected, rtol=1e-5, atol=1e-6)

    # SGA: text guided by the clean image, image guided by those captions, text again from the originals.
    sga = A.SGA(A.PGD(eps_255=2, steps=2), BertAttack(mlm=tiny_mlm(), top_k=3))
    calls = []
    original = sga.text_attack.perturb

    def spy_text(encoder, caps, t2i, objective, image_emb=None, prepared=None):
        out = original(encoder, caps, t2i, objective, image_emb, prepared=prepared)
        # the preparation shared by the two passes gives what a fresh one gives
        assert prepared is not None and out == original(encoder, caps, t2i, objective, image_emb)
        calls.append((list(caps), image_emb.clone(), out, prepared))
        return out

    monkeypatch.setattr(sga.text_attack, "perturb", spy_text)
    result = sga(tiny_encoder, x, captions, txt2img)
    assert len(calls) == 2 and calls[0][0] == captions and calls[1][0] == captions
    with torch.no_grad():
        torch.testing.assert_close(calls[0][1], tiny_encoder.encode_image(x))
        torch.testing.assert_close(calls[1][1], tiny_encoder.encode_image(result.images))
    assert result.captions == calls[1][2] and calls[0][3] is calls[1][3]


def test_robustvlm_momentum_is_sign_pgd_under_linf(tiny_encoder, data):
    x, captions, txt2img = data
    plain = A.PGD(eps_255=4, steps=3, step_255=1)(tiny_encoder, x, captions, txt2img).images
    momentum = A.PGD(eps_255=4, steps=3, step_255=1, momentum=0.9)(tiny_encoder, x, captions, txt2img).images
    torch.testing.assert_close(momentum, plain)
    l2 = A.PGD(eps_255=30, steps=3, step_255=10, norm="l2", momentum=0.9)(
        tiny_encoder, x, captions, txt2img
    ).images
    assert not torch.equal(
        l2, A.PGD(eps_255=30, steps=3, step_255=10, norm="l2")(tiny_encoder, x, captions, txt2img).images
    )


@pytest.mark.parametrize("threshold", [0.3, 0.0])
def test_threshold_pred_score_cuts_one_subword_candidates(position_mlm, tiny_encoder, threshold):
    model, tok = position_mlm  # logits: 10 for x<word>, 5 for the word itself, 0 elsewhere
    attack = BertAttack.from_mlm(model, tok, top_k=4, stop_words=[], threshold_pred_score=threshold)
    prep = attack.prepare_captions(tiny_encoder, ["alpha bravo"])
    if threshold:
        assert prep.candidates[0] == {0: ["xalpha"], 1: ["xbravo"]}  # the word itself dropped, then cut at 0
    else:
        assert all(
            len(c) > 1 and c[0] == f"x{w}"
            for w, c in zip(["alpha", "bravo"], prep.candidates[0].values(), strict=True)
        )


def test_multi_subword_candidates_as_the_reference(flickr_mlm, tiny_encoder):
    """All 24 perplexity-ranked combinations, joined by the tokenizer with real spaces, against a per-word
    re-implementation of the references' get_bpe_substitues (unpadded MLM forward, one word at a time)."""
    import itertools

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder, captions = flickr_mlm
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForMaskedLM.from_pretrained(folder).eval()
    attack = BertAttack.from_mlm(model, tok, top_k=10)
    sample = captions[:40]
    prep = attack.prepare_captions(tiny_encoder, sample)
    pending = [(t, j) for t in range(len(sample)) for j in prep.combos[t]]
    assert len(pending) > 10
    attack._rank_combinations(
        prep.words, prep.candidates, prep.combos, pending
    )  # what the lazy search would rank, all at once
    spaced = 0
    for t, j in pending:
        words = sample[t].split(" ")
        ids = tok(sample[t].split(" "), add_special_tokens=False)["input_ids"]
        start = sum(len(x) for x in ids[:j]) + 1  # [CLS] shift
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([[tok.cls_token_id, *sum(ids, []), tok.sep_token_id]])
            ).logits[0]
        top4 = logits[start : start + len(ids[j])].topk(10, dim=-1).indices[:, :4].tolist()
        combos = torch.tensor(list(itertools.product(*top4))[:24])
        with torch.no_grad():
            out = model(input_ids=combos).logits
        ppl = torch.nn.functional.cross_entropy(out.transpose(1, 2), combos, reduction="none").mean(1).exp()
        texts = [
            tok.convert_tokens_to_string(tok.convert_ids_to_tokens(combos[i].tolist())) for i in ppl.argsort()
        ]
        expected = []
        for c in texts:
            if (
                c != words[j]
                and c.lower() != words[j].lower()
                and "##" not in c
                and c not in attack.stop_words
            ):
                if c not in expected and c not in tok.all_special_tokens:
                    expected.append(c)
        assert prep.candidates[t][j] == expected
        spaced += any(" " in c for c in expected)
    assert spaced > 0  # multi-word candidates occur and keep their spaces


def test_pgd_one_sided_random_start_is_co_attacks(tiny_encoder):
    """Co-Attack's code starts from x + U(0, eps); ours maps the same U(-eps, eps) draw by u -> (u + eps) / 2."""
    x = torch.full((3, 3, 64, 64), 0.5)
    captions, txt2img = ["a red disc", "a blue box", "a green star"], torch.arange(3)
    eps = 4 / 255
    sym = A.PGD(eps_255=4, steps=0, random_start="symmetric", seed=3)(
        tiny_encoder, x, captions, txt2img
    ).images
    one = A.PGD(eps_255=4, steps=0, random_start="one_sided", seed=3)(
        tiny_encoder, x, captions, txt2img
    ).images
    none = A.PGD(eps_255=4, steps=0, random_start=False)(tiny_encoder, x, captions, txt2img).images
    assert (one - x).min() >= 0 and (one - x).max() <= eps + 1e-7 and (one - x).mean() > eps / 4
    assert (sym - x).min() < 0
    torch.testing.assert_close(one - x, ((sym - x) + eps) / 2)
    assert torch.equal(none, x)
    assert A.PGD(random_start=True).random_start == "symmetric"
    with pytest.raises(ConfigError, match="one_sided"):
        A.PGD(norm="l2", random_start="one_sided")
    with pytest.raises(ConfigError, match="random_start"):
        A.PGD(random_start="both")


def test_attacks_and_recall_under_bf16_autocast(tiny_encoder, data):
    """bf16-mixed runs: PGD's objective and the text attack's scores run in float32, the similarity matrix too."""
    from mat_lightning.eval.retrieval import similarity

    x, captions, txt2img = data
    pgd = A.PGD(eps_255=4, steps=3, step_255=1, objective="caption_cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = pgd.clone()(tiny_encoder, x, captions, txt2img).images
        adv_captions = BertAttack(mlm=tiny_mlm(), top_k=5)(tiny_encoder, x, captions, txt2img).captions
        with torch.no_grad():
            img, txt = tiny_encoder.encode_image(x), tiny_encoder.encode_text(captions)
            adv_img = tiny_encoder.encode_image(adv)
        sim = similarity(img, txt)
    assert adv.dtype == torch.float32 and (adv - x).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, img.float() @ txt.float().T)  # not rounded to bf16
    # the attack still works: the adversarial images' cosine to their captions falls
    own = lambda i: (i.float()[txt2img] * txt.float()).sum(-1).mean()  # noqa: E731
    assert own(adv_img) < own(img) - 0.01
    changed = sum(a != b for a, b in zip(adv_captions, captions, strict=True))
    assert changed > len(captions) // 2 and all(
        n_changed_words(b, a) <= 1 for b, a in zip(captions, adv_captions, strict=True)
    )


def test_lazy_perplexity_ranking_equals_eager(flickr_mlm, tiny_encoder):
    """Combinations are ranked only for the words the greedy search reaches; the result is the eager one's."""
    folder, captions = flickr_mlm
    attack = BertAttack(mlm=str(folder), top_k=10, max_words=1)
    sample, t2i = captions[:60], torch.arange(60)
    with torch.no_grad():
        guide = torch.nn.functional.normalize(
            torch.randn(60, tiny_encoder.encode_text(["a"]).shape[1]), dim=-1
        )
    lazy = attack.prepare_captions(tiny_encoder, sample)
    n_pending = sum(len(c) for c in lazy.combos)
    lazy_out = attack.perturb(tiny_encoder, sample, t2i, "image_cosine", guide, prepared=lazy)
    eager = attack.prepare_captions(tiny_encoder, sample)
    attack._rank_combinations(
        eager.words,
        eager.candidates,
        eager.combos,
        [(t, j) for t in range(len(sample)) for j in list(eager.combos[t])],
    )
    assert attack.perturb(tiny_encoder, sample, t2i, "image_cosine", guide, prepared=eager) == lazy_out
    assert 0 < sum(len(c) for c in lazy.combos) < n_pending  # some words were ranked, not all
