"""Results that do not depend on batch size, batch position or the number of processes (fast, one process).

The DDP runs themselves are in ``test_distributed.py`` (slow).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from mat_lightning.attacks import PGD, SGA, BertAttack, CoAttack, SepAttack
from mat_lightning.attacks.base import SampleRandomness
from mat_lightning.attacks.objectives import Gallery, Guidance, split_contrastive
from mat_lightning.cli import agreed_run_dir
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.data.sampling import EvalShards, TrainShards
from mat_lightning.errors import ConfigError
from mat_lightning.eval.robust import robust_retrieval
from mat_lightning.synthetic import data_args, ensure_mlm


def test_random_draws_follow_the_sample_not_the_batch():
    keys = torch.tensor([5, 9, 2, 7])
    together = SampleRandomness(0, keys, torch.device("cpu"), None)
    first, second = together.uniform((4, 3, 2, 2)), together.normal((4, 6))
    for b, key in enumerate(keys):
        alone = SampleRandomness(0, key.view(1), torch.device("cpu"), None)
        assert torch.equal(alone.uniform((1, 3, 2, 2))[0], first[b])
        assert torch.equal(alone.normal((1, 6))[0], second[b])  # the second draw continues the row's stream
    other_seed = SampleRandomness(1, keys, torch.device("cpu"), None).uniform((4, 3, 2, 2))
    assert not torch.equal(other_seed, first)


def test_pgd_random_start_is_the_images_own(tiny_encoder, tiny_test_split):
    images = tiny_test_split[0][:4].float() / 255
    captions = [c for caps in tiny_test_split[1][:4] for c in caps]
    txt2img = torch.arange(4).repeat_interleave(5)
    ids = torch.tensor([10, 11, 12, 13])
    attack = PGD(steps=0, objective="caption_cosine")  # the random start alone: exact comparison
    batch = attack(tiny_encoder, images, captions, txt2img, ids).images
    for b in (3, 0):  # alone, in another order
        alone = attack(
            tiny_encoder,
            images[b : b + 1],
            captions[5 * b : 5 * b + 5],
            torch.zeros(5).long(),
            ids[b : b + 1],
        )
        assert torch.equal(alone.images[0], batch[b])
    assert not torch.equal(batch[0] - images[0], batch[1] - images[1])  # different images, different starts


def _loader(batch_size: int):
    dm = RetrievalDataModule(**data_args("tiny"), image_size=64, eval_batch_size=batch_size)
    dm.setup("test")
    return dm.test_dataloader()


def test_rows_do_not_depend_on_the_eval_batch_size(tiny_encoder):
    """Every row of the suites (PGD, BERT-Attack, Sep-Attack, Co-Attack, SGA) is the same at batch 5 and 32.

    Bugs caught: negatives or guidance taken from the batch (Co-Attack's KL to the batch's texts, a contrastive
    objective over in-batch captions), random starts or noise keyed by the position in the batch, a text attack
    whose candidate ranking or chunking depends on the batch's other captions.
    """
    mlm = str(ensure_mlm("tiny"))
    attacks = [
        PGD(eps_255=2, steps=3, step_255=1, objective="split_contrastive"),
        BertAttack(mlm=mlm, top_k=3),
        SepAttack(PGD(steps=2, step_255=1, objective="caption_cosine"), BertAttack(mlm=mlm, top_k=3)),
        CoAttack(PGD(steps=2, step_255=1), BertAttack(mlm=mlm, top_k=3)),
        SGA(PGD(steps=2, step_255=1), BertAttack(mlm=mlm, top_k=3)),  # keyed Gaussian noise
    ]
    small, whole = (robust_retrieval(tiny_encoder, _loader(b), attacks, progress=False) for b in (5, 32))
    assert [r["attack"] for r in whole] == ["clean", "pgd", "bert_attack", "sep_attack", "co_attack", "sga"]
    assert whole[1]["tr_r1"] < whole[0]["tr_r1"]  # the attacks do something
    for r1, r2 in zip(small, whole, strict=True):
        assert {k: v for k, v in r1.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in r2.items() if k != "seconds"}, abs=1e-6
        )


def test_split_contrastive_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(2, 8, generator=g), dim=-1)  # two adversarial images, split ids 3 and 5
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)  # their guiding captions: 2 of image 3, 1 of 5
    txt2img, ids = torch.tensor([0, 0, 1]), torch.tensor([3, 5])
    gallery = Gallery(
        F.normalize(torch.randn(6, 8, generator=g), dim=-1),
        torch.arange(6),
        F.normalize(torch.randn(12, 8, generator=g), dim=-1),
        torch.arange(6).repeat_interleave(2),
    )
    scale = torch.tensor(10.0)
    got = split_contrastive(
        emb, Guidance(txt2img=txt2img, text_emb=text, logit_scale=scale, image_ids=ids, gallery=gallery)
    )
    i2t = t2i = 0.0
    for b in range(2):
        own = [t for t in range(3) if txt2img[t] == b]
        negatives = [m for m in range(12) if gallery.text_owner[m] != ids[b]]
        for t in own:
            pos = float(scale * emb[b] @ text[t])
            neg = [float(scale * emb[b] @ gallery.text_emb[m]) for m in negatives]
            i2t += -math.log(math.exp(pos) / (math.exp(pos) + sum(map(math.exp, neg)))) / len(own)
    for t in range(3):
        b = int(txt2img[t])
        pos = float(scale * emb[b] @ text[t])
        neg = [
            float(scale * text[t] @ gallery.image_emb[n]) for n in range(6) if gallery.image_ids[n] != ids[b]
        ]
        t2i += -math.log(math.exp(pos) / (math.exp(pos) + sum(map(math.exp, neg))))
    assert float(got) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_split_contrastive_outside_robust_evaluation_says_what_to_do(tiny_encoder):
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(ConfigError, match="robust evaluation"):
        PGD(objective="split_contrastive")(tiny_encoder, images, ["a", "b"], torch.tensor([0, 1]))


def test_global_batches_and_item_keys_do_not_depend_on_the_number_of_processes():
    data = list(range(50))
    one = list(TrainShards(data, 1, 0, seed=3))
    ranks = [list(TrainShards(data, 2, r, seed=3)) for r in range(2)]
    for j in range(3):  # batch j of 8 per rank = batch j of 16 on one process, with the same keys
        assert sorted(ranks[0][8 * j : 8 * j + 8] + ranks[1][8 * j : 8 * j + 8]) == sorted(
            one[16 * j : 16 * j + 16]
        )
    epoch1 = TrainShards(data, 1, 0, seed=3)
    epoch1.set_epoch(1)
    assert [i for i, _ in epoch1] != [i for i, _ in one]  # a new order and new keys every epoch
    shards = [list(EvalShards(list(range(7)), 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))  # every image once, no padding
    assert [len(EvalShards(list(range(7)), 3, r)) for r in range(3)] == [3, 2, 2]


def test_run_folder_is_agreed_across_launched_processes(tmp_path, monkeypatch):
    for var in ("LOCAL_RANK", "MAT_RUN_DIR", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = agreed_run_dir(tmp_path / "exp")
    assert re.fullmatch(r"\d{8}-\d{6}", single.rsplit("/", 1)[1])  # one process: unchanged (timestamp)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    for local_rank in ("0", "3"):  # every process on every node, whatever its environment inherited
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("MAT_RUN_DIR", single)
        assert agreed_run_dir(tmp_path / "exp") == str(tmp_path / "exp" / "torchrun-job42")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert agreed_run_dir(tmp_path / "exp") == str(tmp_path / "exp" / "slurm-777.1")
