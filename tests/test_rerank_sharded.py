"""ITM re-ranking of a fusion model (tiny BLIP) sharded over processes: the same scores and rows as one process.

Two checks: ranks simulated in one process (each scores the pairs of its own images; the slices are summed by
hand) against the unsharded scores and against the HF model scoring each pair itself; and a real 2-process gloo run
of the robust-evaluation suite against one process (``benchmarks/rerank_scaling.py`` is the worker).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.rerank_scaling import evaluate, run_world, save_tiny_blip, shard_batches, world_words
from mat_lightning.eval.rerank import rerank
from mat_lightning.models.hf import CLIP_MEAN, CLIP_STD, BlipRetrievalEncoder
from mat_lightning.synthetic import ensure_mlm

K = 3


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory, tiny_world) -> str:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("blip")
    return str(save_tiny_blip(folder, AutoTokenizer.from_pretrained(ensure_mlm("tiny"))))


def _split(encoder: BlipRetrievalEncoder, n_images: int):
    """Images float[n, 3, 32, 32], their 5 captions each, and the ITC similarities float[n, 5n]."""
    (batch,) = shard_batches(n_images, encoder.image_size, world_words(encoder.tokenizer), 1, 0, n_images)
    with torch.no_grad():
        sim = encoder.encode_image(batch.images) @ encoder.encode_text(batch.captions).T
    return batch.images, batch.captions, sim


def test_sharded_slices_reassemble_the_unsharded_scores(tiny_blip):
    """Two simulated ranks (images 0, 2, 4 and 1, 3, 5) each score the candidate pairs of their own images; the sum of
    their slices gives the one-process scores, each candidate's score is the HF model's ITM logit of that pair plus
    its ITC similarity, and every candidate pair is scored exactly once by one rank. Fails if a pair is scored by
    both ranks or by none (its score doubled or left at 0), if states are looked up by the wrong row, or if the
    image-query and caption-query candidates are mixed up."""
    from transformers import BlipForImageTextRetrieval

    encoder = BlipRetrievalEncoder(tiny_blip, rerank_k=K).eval()
    images, captions, sim = _split(encoder, 6)
    states = dict(enumerate(encoder.itm_image_states(images)))
    scored: list[int] = []
    itm_scores = encoder.itm_scores
    encoder.itm_scores = lambda s, c: scored.append(len(c)) or itm_scores(s, c)
    whole = rerank(encoder, sim, states, captions)
    partial: list[torch.Tensor] = []
    shards = [{r: s for r, s in states.items() if r % 2 == rank} for rank in (0, 1)]
    scored.clear()
    for shard in shards:
        rerank(encoder, sim, shard, captions, reduce=lambda t: partial.append(t.clone()) or t)
    per_rank = list(scored)
    summed = [
        rerank(encoder, sim, shard, captions, reduce=lambda t: partial[0] + partial[1]) for shard in shards
    ]
    for i2t, t2i in summed:  # every rank ends with the one-process matrices
        torch.testing.assert_close(i2t, whole[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(t2i, whole[1], atol=1e-6, rtol=0)

    candidates = {(i, int(j)) for i in range(6) for j in sim[i].topk(K).indices}
    candidates |= {(int(i), j) for j in range(30) for i in sim[:, j].topk(K).indices}
    assert per_rank == [sum(i % 2 == rank for i, _ in candidates) for rank in (0, 1)]

    ref = BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()
    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    i2t, t2i = whole
    with torch.no_grad():
        for i, j in sorted(candidates):
            tok = encoder.tokenizer([captions[j]], return_tensors="pt")
            itm = ref(
                input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels[i : i + 1]
            )
            expected = float(itm.itm_score[0, 1]) + float(sim[i, j])
            if j in sim[i].topk(K).indices:
                assert float(i2t[i, j]) == pytest.approx(expected, abs=1e-5)
            if i in sim[:, j].topk(K).indices:
                assert float(t2i[i, j]) == pytest.approx(expected, abs=1e-5)
    for row_sim, row_new in (
        (sim, i2t),
        (sim.T, t2i.T),
    ):  # the candidates above the rest, the rest in ITC order
        top = row_sim.topk(K, dim=1).indices
        rest = torch.ones_like(row_sim, dtype=torch.bool).scatter(1, top, False)
        assert (
            row_new.gather(1, top).min(dim=1).values > row_new.masked_fill(~rest, -1e9).max(dim=1).values
        ).all()
        for r in range(len(row_sim)):
            assert torch.equal(row_sim[r][rest[r]].argsort(), row_new[r][rest[r]].argsort())


def test_blip_rows_on_two_processes_equal_one_process(tiny_blip, tmp_path):
    """The robust-evaluation suite (clean, PGD on split_contrastive, BERT-Attack) of a tiny BLIP with ITM
    re-ranking, on 2 gloo processes (4 images each) and on this one (8 images): the same rows; each rank kept the
    states of its own 4 images only and scored half of the pairs or so, the two together as many as one process.
    Fails if the ranks' score slices are combined wrongly (a pair counted twice or missing), if a rank re-ranks
    with another rank's images, or if captions are gathered out of order."""
    one = evaluate(tiny_blip, 8, K, suite=True)
    two = run_world(tiny_blip, 8, K, 2, tmp_path, suite=True)
    assert [r["attack"] for r in one["rows"]] == ["clean", "pgd", "bert_attack"]
    for rank in two:
        for r1, r2 in zip(one["rows"], rank["rows"], strict=True):
            assert r1.keys() == r2.keys()
            for key, value in r1.items():
                assert r2[key] == (value if isinstance(value, str | None) else pytest.approx(value, abs=1e-6))
        assert (
            rank["images_with_states"] == one["images_with_states"] / 2 == 4 * 3
        )  # its images, once per row
        assert 0 < rank["itm_pairs"] < one["itm_pairs"]
    assert sum(r["itm_pairs"] for r in two) == one["itm_pairs"]
