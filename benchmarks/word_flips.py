"""Why 1-word text attacks are nearly total in the synthetic world: a diagnosis, measured on the cached tiny CLIP.

``python -m benchmarks.word_flips [--ckpt runs/.../last.ckpt]`` prints, on the world's test split:

1. clean recall;
2. recall after replacing **one random** colour word of every caption by another colour (no search at all), and
   the same for one random shape word;
3. what BERT-Attack actually changes: the share of its substitutions that turn a colour word into another colour,
   a shape into another shape, or something else.

If a random colour flip alone destroys retrieval, any defense is asked to retrieve an image from a caption that now
describes a different scene: the text side of the benchmark then measures label noise, not robustness.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from mat_lightning import synthetic
    from mat_lightning.attacks import BertAttack
    from mat_lightning.eval.retrieval import recall_at_k
    from mat_lightning.models.encoder import OpenClipEncoder
    from mat_lightning.synthetic import classic as S

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", default=None, help="a MatModule checkpoint (default: the pretrained tiny CLIP)"
    )
    parser.add_argument("--preset", default="default", help="a preset of the classic generator")
    args = parser.parse_args()
    generator = synthetic.preset(args.preset).world.generator
    if generator != "classic":  # the flips below use the classic vocabulary
        raise SystemExit(
            f"--preset {args.preset}: a {generator!r} world; this diagnosis reads the classic one's words"
        )
    encoder = OpenClipEncoder("mat-tiny", pretrained=str(synthetic.ensure_clip(args.preset))).eval()
    if args.ckpt:
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)["state_dict"]
        encoder.load_state_dict(
            {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        )
    images, caps = synthetic.load_split(args.preset, "test")
    x = images.float() / 255
    flat = [c for cs in caps for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    word_class = {w: ("colour", c) for c, ws in S.COLOUR_WORDS.items() for w in ws}
    word_class |= {w: ("shape", c) for c, ws in S.SHAPE_WORDS.items() for w in ws}

    def flip(caption: str, kind: str, rng: random.Random) -> str:
        words = caption.split(" ")
        slots = [j for j, w in enumerate(words) if word_class.get(w, ("",))[0] == kind]
        if not slots:
            return caption
        j = rng.choice(slots)
        table = S.COLOUR_WORDS if kind == "colour" else S.SHAPE_WORDS
        other = rng.choice([c for c in table if c != word_class[words[j]][1]])
        words[j] = rng.choice(table[other])
        return " ".join(words)

    with torch.no_grad():
        img = encoder.encode_image(x)

        def recall(captions: list[str]) -> dict[str, float]:
            r = recall_at_k(img @ encoder.encode_text(captions).T, txt2img)
            return {k: round(v, 1) for k, v in r.items() if k in ("tr_r1", "ir_r1", "r_mean")}

        out = {"clean": recall(flat)}
        for kind in ("colour", "shape"):
            rng = random.Random(0)
            out[f"one_random_{kind}_flip"] = recall([flip(c, kind, rng) for c in flat])
    adv = BertAttack(mlm=str(synthetic.ensure_mlm(args.preset))).perturb(
        encoder, flat, txt2img, "image_cosine", img
    )
    kinds: Counter[str] = Counter()
    for before, after in zip(flat, adv, strict=True):
        for a, b in zip(before.split(" "), after.split(" "), strict=True):
            if a != b:
                ka, kb = word_class.get(a), word_class.get(b)
                kinds[
                    "colour->colour"
                    if ka and kb and ka[0] == kb[0] == "colour"
                    else "shape->shape"
                    if ka and kb and ka[0] == kb[0] == "shape"
                    else "other"
                ] += 1
    total = sum(kinds.values())
    out["bert_attack"] = recall(adv)
    out["bert_attack_substitutions"] = {k: f"{100 * v / total:.1f}%" for k, v in kinds.most_common()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
