"""A tiny BERT masked LM trained on a caption corpus: the synthetic world's stand-in for ``bert-base-uncased``.

BERT-Attack needs a masked LM to propose substitutes. Real runs use ``bert-base-uncased``; offline, we train a tiny
``BertForMaskedLM`` on the world's captions and save it with ``save_pretrained``, so the attack loads it through the
same ``from_pretrained(path)`` code as a user's model.

The WordPiece vocabulary holds the corpus words, except that words longer than ``split_above`` letters are only
known as two pieces (``tangerine`` -> ``tang ##erine``), plus single letters and digits (with their ``##`` forms) so
any text tokenises without ``[UNK]``: multi-sub-word words occur, as they do with BERT's vocabulary, and the attack's
perplexity-ranked combination path runs on them.
"""

from __future__ import annotations

import logging
import math
import random
import string
from collections.abc import Sequence
from pathlib import Path

import torch

from mat_lightning.progress import note
from mat_lightning.progress import progress as progress_of

log = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(captions: Sequence[str], split_above: int = 7) -> list[str]:
    """WordPiece vocabulary (specials first) for ``captions``; see the module doc for the splitting rule."""
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=True)
    words: dict[str, None] = {}
    for c in captions:
        for w in basic.tokenize(c):
            if len(w) > split_above and w.isalpha():
                words[w[:4]] = None
                words["##" + w[4:]] = None
            else:
                words[w] = None
    chars = list(string.ascii_lowercase + string.digits)
    pieces = chars + ["##" + ch for ch in chars] + list(string.punctuation)
    return list(dict.fromkeys(SPECIAL + sorted(words) + pieces))


def train_tiny_mlm(
    captions: Sequence[str],
    out_dir: str | Path,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a tiny ``BertForMaskedLM`` on ``captions`` and ``save_pretrained`` it (model + tokenizer) to ``out_dir``.

    Standard BERT masking: 15 % of the tokens are predicted; of those 80 % become ``[MASK]``, 10 % a random token,
    10 % stay.
    """
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("\n".join(build_vocab(captions)) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    model = BertForMaskedLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    special_ids = torch.tensor(tok.all_special_ids)
    model.train()
    running = None  # the loss's moving average over ~20 steps, shown beside the bar
    for _ in progress_of(
        range(steps), "training the synthetic world's masked LM", enabled=progress, unit="steps"
    ):
        batch = tok(
            [rng.choice(captions) for _ in range(batch_size)],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        input_ids, labels = batch["input_ids"].clone(), batch["input_ids"].clone()
        can_mask = ~torch.isin(input_ids, special_ids)
        chosen = (torch.rand(input_ids.shape) < 0.15) & can_mask
        labels[~chosen] = -100
        roll = torch.rand(input_ids.shape)
        input_ids[chosen & (roll < 0.8)] = tok.mask_token_id
        random_tokens = torch.randint(len(SPECIAL), len(tok), input_ids.shape)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        input_ids[swap] = random_tokens[swap]
        loss = model(input_ids=input_ids, attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.detach() if running is None else 0.95 * running + 0.05 * loss.detach()
        note(loss=running)
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    log.info("tiny masked LM saved to %s (final loss %.3f)", out_dir, loss.item())
    return out_dir
