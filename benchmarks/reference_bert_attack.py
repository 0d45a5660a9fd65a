"""A per-caption BERT-Attack loop, written here from the published algorithm of SGA's ``img_guided_attack`` (Lu et
al., ICCV 2023; reference-implementations.md §2) as the baseline of `make bench`. Not used by the package.

One caption at a time: one MLM forward on the caption (``[CLS] ... [SEP]``, truncated to ``max_length``), top-k per
position; importance of every word from its ``[UNK]`` variant (KL of the softmaxed text embeddings), text forwards in
chunks of 32 at the full 77-token CLIP context; then words by importance: stop words and words past ``max_length``
skipped; candidates cut at the first raw logit below ``threshold`` (one sub-word) or the first 24 combinations of the
top-4 tokens per sub-word ranked by MLM perplexity (one MLM forward per word); the word itself, ``##`` pieces and stop
words dropped; the current caption and its variants scored by cosine to the guiding image, the lowest kept. Words'
sub-words are read at the reference's position (no ``[CLS]`` shift: the off-by-one of the published code).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


@torch.no_grad()
def full_context_text(encoder, texts: list[str]) -> torch.Tensor:
    """CLIP text embeddings at the full context (open_clip's own path, as ``clip.tokenize(..., 77)``)."""
    out = []
    for i in range(0, len(texts), 32):
        ids = encoder.tokenize(texts[i : i + 32])
        out.append(encoder.model.encode_text(ids, normalize=True).float())
    return torch.cat(out)


@torch.no_grad()
def reference_attack(
    encoder,
    mlm,
    tok,
    caption: str,
    image_emb: torch.Tensor,
    stop_words: frozenset[str],
    top_k: int = 10,
    max_length: int = 77,
    threshold: float = 0.3,
) -> str:
    words = caption.split(" ")
    sub_words, keys = [], []
    for w in words:
        pieces = tok.tokenize(w)
        keys.append((len(sub_words), len(sub_words) + len(pieces)))
        sub_words += pieces
    ids = tok.convert_tokens_to_ids([tok.cls_token] + sub_words[: max_length - 2] + [tok.sep_token])
    logits = mlm(input_ids=torch.tensor([ids])).logits[0]
    pred_scores, pred_ids = logits.topk(top_k, dim=-1)

    orig = full_context_text(encoder, [caption])
    variants = [" ".join(words[:j] + ["[UNK]"] + words[j + 1 :]) for j in range(len(words))]
    masked = full_context_text(encoder, variants)
    importance = F.kl_div(masked.log_softmax(-1), orig.softmax(-1).expand_as(masked), reduction="none").sum(
        -1
    )
    order = sorted(enumerate(importance.tolist()), key=lambda x: x[1], reverse=True)

    final = list(words)
    for j, _ in order:
        word = final[j]
        if word.lower() in stop_words or keys[j][0] > max_length - 2:
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
                tok.convert_tokens_to_string(tok.convert_ids_to_tokens(c.tolist())) for c in ranked
            ]
        texts, choices = [" ".join(final)], [word]
        for s in substitutes:
            if s.lower() == word.lower() or "##" in s or s.lower() in stop_words:
                continue
            texts.append(" ".join(final[:j] + [s] + final[j + 1 :]))
            choices.append(s)
        if len(texts) == 1:
            continue
        emb = full_context_text(encoder, texts)
        best = int((-(emb @ image_emb)).argmax())
        final[j] = choices[best]
        if best != 0:
            break  # one word changed (num_perturbation = 1)
    return " ".join(final)
