"""Why 1-word text attacks are nearly total in the synthetic world: a diagnosis, measured on the cached tiny CLIP.

``python -m benchmarks.word_flips [--ckpt runs/.../last.ckpt]`` prints, on the world's test split:

1. clean recall;
2. recall after replacing **one random** colour word of every caption by another colour (no search at all), and
   the same for one random shape word;
3. why a random colour flip wins (text->image, over the captions retrieved correctly before the flip): the median
   clean margin (cosine of the true image minus that of the best other image), the median fall of the true image's
   cosine under the flip, and, among the captions the flip makes fail, the share whose new top image matches fewer
   of the flipped caption's (colour, shape) pairs than the true image does (a partial matcher would never rank
   such an image first);
4. what BERT-Attack actually changes: the share of its substitutions that turn a colour word into another colour,
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
    encoder = OpenClipEncoder(
        synthetic.preset(args.preset).clip.model_name, pretrained=str(synthetic.ensure_clip(args.preset))
    ).eval()
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
        slots = [j for j, w in enumerate(words) if word_class.get(w.strip(",:"), ("",))[0] == kind]
        if not slots:
            return caption
        j = rng.choice(slots)
        word = words[j].strip(",:")
        table = S.COLOUR_WORDS if kind == "colour" else S.SHAPE_WORDS
        other = rng.choice([c for c in table if c != word_class[word][1]])
        words[j] = words[j].replace(word, rng.choice(table[other]))
        return " ".join(words)

    def pairs(caption: str) -> set[tuple[str, str]]:
        """The (colour, shape) concepts a caption names: a colour word followed by a shape word."""
        ws = caption.replace(",", " ").replace(":", " ").split()
        return {
            (word_class[a][1], word_class[b][1])
            for a, b in zip(ws, ws[1:], strict=False)
            if word_class.get(a, ("",))[0] == "colour" and word_class.get(b, ("",))[0] == "shape"
        }

    with torch.no_grad():
        img = encoder.encode_image(x)

        def cosines(captions: list[str]) -> torch.Tensor:
            return encoder.encode_text(captions) @ img.T  # (captions, images)

        def recall(sim: torch.Tensor) -> dict[str, float]:
            r = recall_at_k(sim.T, txt2img)
            return {k: round(v, 1) for k, v in r.items() if k in ("tr_r1", "ir_r1", "r_mean")}

        s_clean = cosines(flat)
        out = {"clean": recall(s_clean)}
        flipped: dict[str, list[str]] = {}
        flipped_sim: dict[str, torch.Tensor] = {}
        for kind in ("colour", "shape"):
            rng = random.Random(0)
            flipped[kind] = [flip(c, kind, rng) for c in flat]
            flipped_sim[kind] = cosines(flipped[kind])
            out[f"one_random_{kind}_flip"] = recall(flipped_sim[kind])
        # Classic captions name every object, so the union of an image's captions' pairs is its scene.
        truth = [set().union(*(pairs(c) for c in cs)) for cs in caps]
        rows = torch.arange(len(flat))
        s_flip = flipped_sim["colour"]
        own = torch.nn.functional.one_hot(txt2img, len(caps)).bool()
        hit = s_clean.argmax(1) == txt2img
        margin = s_clean[rows, txt2img] - s_clean.masked_fill(own, -2.0).max(1).values
        fall = s_clean[rows, txt2img] - s_flip[rows, txt2img]
        lost = torch.nonzero(hit & (s_flip.argmax(1) != txt2img)).flatten().tolist()
        fewer = sum(
            len(pairs(flipped["colour"][k]) & truth[int(s_flip[k].argmax())])
            < len(pairs(flipped["colour"][k]) & truth[int(txt2img[k])])
            for k in lost
        )
        out["one_random_colour_flip_why"] = {
            "median_clean_margin_cos": round(margin[hit].median().item(), 3),
            "median_fall_of_true_cos": round(fall[hit].median().item(), 3),
            "ir_hits_lost": len(lost),
            "lost_to_an_image_matching_fewer_pairs": f"{100 * fewer / max(1, len(lost)):.1f}%",
        }
    adv = BertAttack(mlm=str(synthetic.ensure_mlm(args.preset))).perturb(
        encoder, flat, txt2img, "image_cosine", img
    )
    kinds: Counter[str] = Counter()
    for before, after in zip(flat, adv, strict=True):
        words_before, words_after = before.split(" "), after.split(" ")
        if len(words_before) != len(words_after):  # the attack's output is re-tokenised text
            kinds["other"] += 1
            continue
        for a, b in zip(words_before, words_after, strict=True):
            if a != b:
                ka, kb = word_class.get(a.strip(",:")), word_class.get(b.strip(",:"))
                kinds[
                    "colour->colour"
                    if ka and kb and ka[0] == kb[0] == "colour"
                    else "shape->shape"
                    if ka and kb and ka[0] == kb[0] == "shape"
                    else "other"
                ] += 1
    total = sum(kinds.values())
    with torch.no_grad():
        out["bert_attack"] = recall(cosines(adv))
    out["bert_attack_substitutions"] = {k: f"{100 * v / total:.1f}%" for k, v in kinds.most_common()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
