"""The published BERT-Attack text attack of Co-Attack and SGA as a per-caption loop: the baseline of `make bench`.

Written here from the published algorithm (Co-Attack @ 96f2c0eb ``attack/bert_attack.py::BertAttack.attack``,
SGA @ f49e6926 ``attacker.py::TextAttacker.img_guided_attack``; reference-implementations.md §1-2), not copied, and
independent of the package's batched code. ``tests/test_reference_attacks.py`` checks that it reproduces the
outputs of the published code itself (the fixture in ``tests/fixtures/reference_attacks``), so the bench's "%
identical" is measured against an equivalent of the published attack, not against a rewrite sharing our choices.

One caption at a time, as theirs: one MLM forward on ``[CLS] X`` (no ``[SEP]``) padded to ``max_length``; the
importance of every word from its ``[UNK]`` variant (KL of the softmaxed text embeddings), text forwards in chunks
of 32; words by importance: stop words (exact) and words whose first sub-word lies past ``max_length - 2`` skipped;
candidates read at the word's sub-word indices *without* the ``[CLS]`` shift (their off-by-one): one position:
the top-k cut at the first raw logit below the threshold; several: the first 24 combinations of the top-4 tokens of
the first 12 positions, ranked by MLM perplexity; the word itself, ``##`` pieces and stop words dropped (``[UNK]``
stays); the current caption and its variants scored (``image_cosine``: lowest cosine to the guiding image;
``embedding_kl``: largest KL from the clean caption), the best kept; stop after one changed word. Every text the
CLIP encoder reads is the BERT round trip of the caption at ``max_length`` tokens (their CLIP wrapper decodes the
BERT ids and re-tokenises).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def bert_round_trip(tok, texts: list[str], max_length: int) -> list[str]:
    """``[CLS] X`` truncated to ``max_length`` BERT tokens, decoded, ``[PAD]``/``[CLS]``/``[SEP]`` removed."""
    out = []
    for text in texts:
        ids = [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"][: max_length - 1]
        ids += [tok.pad_token_id] * (max_length - len(ids))
        s = tok.decode(ids, clean_up_tokenization_spaces=True)
        out.append(s.replace("[PAD]", "").replace("[CLS]", "").replace("[SEP]", "").strip())
    return out


@torch.no_grad()
def encode_view(encoder, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """The CLIP text embeddings of the round-tripped texts, in chunks of 32."""
    views = bert_round_trip(tok, texts, max_length)
    return torch.cat([encoder.encode_text(views[i : i + 32]).float() for i in range(0, len(views), 32)])


def _kl(emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.kl_div(emb.log_softmax(-1), target.softmax(-1).expand_as(emb), reduction="none").sum(-1)


@torch.no_grad()
def reference_attack(
    encoder,
    mlm,
    tok,
    caption: str,
    image_emb: torch.Tensor | None,
    stop_words: frozenset[str],
    objective: str = "image_cosine",
    top_k: int = 10,
    max_length: int = 77,
    threshold: float = 0.3,
) -> str:
    words = caption.split(" ")
    keys, n = [], 0
    for w in words:
        pieces = tok.tokenize(w)
        keys.append((n, n + len(pieces)))
        n += len(pieces)
    ids = [tok.cls_token_id] + tok(caption, add_special_tokens=False)["input_ids"][: max_length - 1]
    mask = [1] * len(ids) + [0] * (max_length - len(ids))
    ids += [tok.pad_token_id] * (max_length - len(ids))
    logits = mlm(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask])).logits[0]
    pred_scores, pred_ids = logits.topk(top_k, dim=-1)

    orig = encode_view(encoder, tok, [caption], max_length)
    variants = [" ".join(words[:j] + ["[UNK]"] + words[j + 1 :]) for j in range(len(words))]
    importance = _kl(encode_view(encoder, tok, variants, max_length), orig)
    order = sorted(enumerate(importance.tolist()), key=lambda x: x[1], reverse=True)

    final = list(words)
    for j, _ in order:
        word = words[j]
        if word in stop_words or keys[j][0] > max_length - 2:
            continue
        sub_ids, sub_scores = pred_ids[keys[j][0] : keys[j][1]], pred_scores[keys[j][0] : keys[j][1]]
        if sub_ids.shape[0] == 0:
            continue
        if sub_ids.shape[0] == 1:
            substitutes = []
            for i, s in zip(sub_ids[0].tolist(), sub_scores[0].tolist(), strict=True):
                if threshold != 0 and s < threshold:
                    break
                substitutes.append(tok.convert_ids_to_tokens(i))
        else:
            combos = torch.tensor(list(itertools.product(*sub_ids[:12, :4].tolist()))[:24])
            out = mlm(input_ids=combos).logits
            ppl = F.cross_entropy(out.transpose(1, 2), combos, reduction="none").mean(1).exp()
            ranked = combos[torch.sort(ppl).indices]
            substitutes = [
                " ".join(tok.convert_ids_to_tokens(c.tolist())).replace(" ##", "").strip() for c in ranked
            ]
        texts, choices = [" ".join(final)], [word]
        for s in substitutes:
            if s == word or "##" in s or s in stop_words:
                continue
            texts.append(" ".join(final[:j] + [s] + final[j + 1 :]))
            choices.append(s)
        emb = encode_view(encoder, tok, texts, max_length)
        score = -(emb @ image_emb.float()) if objective == "image_cosine" else _kl(emb, orig)
        best = int(score.argmax())
        final[j] = choices[best]
        if choices[best] != word:
            break  # one word changed (num_perturbation = 1)
    return " ".join(final)
