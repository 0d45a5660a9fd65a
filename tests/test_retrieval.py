"""recall@K and attack success against brute-force references (ragged 1:N data, ties, chunking)."""

from __future__ import annotations

import pytest
import torch

from mat_lightning.eval.retrieval import RetrievalRanks, attack_success, recall_at_k, retrieval_ranks


def brute_force(sim: torch.Tensor, txt2img: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Definition-level reference: explicit loops, pessimistic ties (equal-scoring negatives rank first)."""
    n_img, n_txt = sim.shape
    out = {}
    tr_rank, ir_rank = [], []
    for i in range(n_img):
        pos = [t for t in range(n_txt) if txt2img[t] == i]
        if not pos:
            tr_rank.append(n_txt)
            continue
        best = max(sim[i, t].item() for t in pos)
        tr_rank.append(sum(1 for t in range(n_txt) if t not in pos and sim[i, t].item() >= best))
    for t in range(n_txt):
        own = txt2img[t].item()
        ir_rank.append(sum(1 for j in range(n_img) if j != own and sim[j, t].item() >= sim[own, t].item()))
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * sum(r < k for r in tr_rank) / n_img
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * sum(r < k for r in ir_rank) / n_txt
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def ragged(n_img: int, seed: int, lo: int = 1, hi: int = 7):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(lo, hi + 1, (n_img,), generator=g)
    txt2img = torch.repeat_interleave(torch.arange(n_img), counts)
    return txt2img, g


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_brute_force_on_ragged_data(seed, chunk):
    txt2img, g = ragged(23, seed)
    img = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=-1)
    # captions close to their image, with noise, so recall is neither 0 nor 100
    txt = torch.nn.functional.normalize(
        img[txt2img] + 0.9 * torch.randn(len(txt2img), 8, generator=g), dim=-1
    )
    sim = img @ txt.T
    got = recall_at_k(sim, txt2img, chunk_size=chunk)
    ref = brute_force(sim, txt2img)
    assert got == pytest.approx(ref)
    assert 0 < got["tr_r1"] < 100 and 0 < got["ir_r1"] < 100


def test_ties_count_against_the_query():
    # Quantised scores create many ties; the reference counts tied negatives above the positive.
    txt2img, g = ragged(15, 5)
    sim = torch.randint(0, 3, (15, len(txt2img)), generator=g).float()
    assert recall_at_k(sim, txt2img, chunk_size=4) == pytest.approx(brute_force(sim, txt2img))
    # Collapsed embeddings (every score equal) are a total failure, not a perfect retrieval.
    flat = recall_at_k(torch.ones(10, 30), torch.arange(10).repeat_interleave(3))
    assert flat["tr_r1"] == 0 and flat["ir_r1"] == 0
    assert flat["tr_r10"] == 0  # 27 negatives tie with the best positive


def test_perfect_and_hand_made_rankings():
    # 3 images, captions 0,1 -> image 0; 2 -> image 1; 3,4,5 -> image 2
    txt2img = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.0, 0.0, 0.95],  # best own caption 0.9, one negative (0.95) above -> TR rank 1
            [0.0, 0.0, 0.5, 0.6, 0.0, 0.0],  # own caption 0.5, negative 0.6 above -> rank 1
            [0.0, 0.0, 0.0, 0.1, 0.3, 0.2],  # own best 0.3, nothing above -> rank 0
        ]
    )
    ranks = retrieval_ranks(sim, txt2img)
    assert ranks.tr.tolist() == [1, 1, 0]
    # IR: caption 5 (image 2) scores 0.95 with image 0 -> rank 1; caption 3 (image 2) 0.6 with image 1 -> rank 1
    assert ranks.ir.tolist() == [0, 0, 0, 1, 0, 1]
    r = recall_at_k(sim, txt2img, ks=(1, 2))
    assert r["tr_r1"] == pytest.approx(100 / 3) and r["tr_r2"] == 100
    assert r["ir_r1"] == pytest.approx(400 / 6) and r["ir_r2"] == 100


def test_image_without_captions_is_never_a_hit():
    sim = torch.rand(3, 2)
    ranks = retrieval_ranks(sim, torch.tensor([0, 0]))
    assert recall_at_k(sim, torch.tensor([0, 0]), ks=(1, 5, 10))["tr_r10"] == pytest.approx(100 / 3)
    assert ranks.tr[0] == 0  # image 0 owns every caption: nothing can outrank it


def test_attack_success_definitions_on_hand_built_ranks():
    clean = RetrievalRanks(tr=torch.tensor([0, 0, 0, 5]), ir=torch.tensor([0, 3, 0, 12]))
    adv = RetrievalRanks(tr=torch.tensor([0, 4, 12, 0]), ir=torch.tensor([2, 3, 0, 12]))
    s = attack_success(clean, adv, ks=(1, 5))
    # TR@1: clean hits {0,1,2}; adv hits {0,3} -> recall 75 -> 50; flips: 1 and 2 lost out of 3 clean hits
    assert s["asr_drop_tr_r1"] == pytest.approx(25.0)
    assert s["asr_flip_tr_r1"] == pytest.approx(200 / 3)
    # TR@5: clean hits {0,1,2} (rank 5 is a miss); adv hits {0,1,3}: one lost -> flip 1/3; recall unchanged
    assert s["asr_drop_tr_r5"] == pytest.approx(0.0)
    assert s["asr_flip_tr_r5"] == pytest.approx(100 / 3)
    # IR@1: clean hits {0,2}; adv hits {2}: one lost of two
    assert s["asr_flip_ir_r1"] == pytest.approx(50.0)
    assert s["asr_drop_ir_r1"] == pytest.approx(25.0)


def test_asr_flip_is_zero_without_clean_hits():
    r = RetrievalRanks(tr=torch.tensor([9, 9]), ir=torch.tensor([9]))
    assert attack_success(r, r, ks=(1,))["asr_flip_tr_r1"] == 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="txt2img"):
        recall_at_k(torch.rand(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        recall_at_k(torch.rand(3, 2), torch.tensor([0, 5]))
