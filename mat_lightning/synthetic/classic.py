"""The classic synthetic world: scenes of 2-4 coloured shapes, their renderer and their caption grammar.

No data set or pretrained weights can be downloaded on our machines, so the synthetic world is the embedded default
on which the whole pipeline (pretraining, fine-tuning with MAT, attacks, retrieval evaluation) runs on a laptop CPU.
It is a simulation for trying the method, **not** a benchmark about Flickr30K or COCO.

What it models:

* **scenes** of 2-4 objects (shape x colour x size x position) on a plain background (configurable);
* a **renderer** to PNG (default 64x64);
* a **caption grammar** with a thesaurus ("a red circle left of a small blue square", "a small azure box to the
  right of a crimson disc"), so five ground-truth captions per image differ in words, order and detail, as human
  captions do;
* the simulated **1:N generators** of MAT+ (DESIGN §2): grammar re-sampling (LM rewrite), an oracle captioner in
  another style that may omit details (I2T), and a re-rendering of a caption's scene in a new layout (T2I).

This module is the ``classic`` generator of :data:`mat_lightning.synthetic.dataset.GENERATORS`: it provides the
generator interface (:func:`sample_scene`, :func:`render`, :func:`describe`, :func:`oracle_caption`,
:func:`relayout`, :func:`scene_from_json`, :func:`thesaurus`, and the optional :func:`check_config`) that
:func:`~mat_lightning.synthetic.dataset.write_world` and the asset builders call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from mat_lightning.errors import ConfigError

if TYPE_CHECKING:
    from mat_lightning.synthetic.dataset import WorldConfig

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary. Each concept maps to the words that may name it; the first word is the canonical one.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald", "lime"],
    "blue": ["blue", "azure", "navy"],
    "yellow": ["yellow", "golden", "lemon"],
    "purple": ["purple", "violet", "lilac"],
    "orange": ["orange", "amber", "tangerine"],
}
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "pyramid"],
    "cross": ["cross", "plus", "x"],
    "star": ["star", "starburst", "asterisk"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
SIZE_WORDS: dict[str, list[str]] = {
    "small": ["small", "tiny", "little"],
    "large": ["large", "big", "huge"],
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 18),
    "gray": (120, 120, 125),
    "white": (235, 235, 230),
}
BACKGROUND_WORDS: dict[str, list[str]] = {
    "black": ["black", "dark"],
    "gray": ["gray", "grey"],
    "white": ["white", "pale"],
}
# Relations of object a to object b, by the dominant axis of (b - a).
RELATION_WORDS: dict[str, list[str]] = {
    "left of": ["left of", "to the left of", "on the left of"],
    "right of": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

RADIUS_FRACTION = {"small": 0.11, "large": 0.19}  # of the image side


def thesaurus() -> dict[str, list[str]]:
    """Word -> its synonyms in this world (every word of a synonym group maps to the others).

    Multi-word relation phrases are left out: EDA replaces single words.
    """
    out: dict[str, list[str]] = {}
    for groups in (COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, BACKGROUND_WORDS):
        for words in groups.values():
            for w in words:
                out[w] = [s for s in words if s != w]
    for w, syns in {
        "picture": ["image", "photo"],
        "image": ["picture", "photo"],
        "photo": ["picture", "image"],
        "shapes": ["objects", "figures"],
        "objects": ["shapes", "figures"],
        "figures": ["shapes", "objects"],
        "over": ["above"],
        "above": ["over"],
        "under": ["below", "beneath"],
        "below": ["under", "beneath"],
        "beneath": ["below", "under"],
        "background": ["backdrop"],
        "backdrop": ["background"],
    }.items():
        out.setdefault(w, syns)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """One object. ``x``, ``y`` are the centre in [0, 1] image coordinates (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_json(d: dict) -> Scene:
        return Scene(background=d["background"], objects=tuple(SceneObject(**o) for o in d["objects"]))


def scene_from_json(d: dict) -> Scene:
    """The scene a data set entry stores (``Scene.to_json``)."""
    return Scene.from_json(d)


def _place(rng: random.Random, sizes: list[str], tries: int = 200) -> list[tuple[float, float]]:
    """Non-overlapping centres for objects of the given sizes, inside the frame."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        r = RADIUS_FRACTION[size]
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            ok = all(
                math.hypot(x - cx, y - cy) > r + RADIUS_FRACTION[s] + 0.04
                for (cx, cy), s in zip(centres, sizes, strict=False)
            )
            if ok:
                break
        centres.append((x, y))
    return centres


def random_scene(
    rng: random.Random,
    max_objects: int = 3,
    min_objects: int = 1,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
) -> Scene:
    """A random scene of min_objects..max_objects objects with distinct (shape, colour) pairs, drawn from the given
    colour and shape inventories (default: all)."""
    colours, shapes = list(colours or COLOURS), list(shapes or SHAPE_WORDS)
    n = rng.randint(min_objects, max_objects)
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = (rng.choice(shapes), rng.choice(colours))
        if kind not in kinds:
            kinds.append(kind)
    sizes = [rng.choice(list(SIZE_WORDS)) for _ in range(n)]
    centres = _place(rng, sizes)
    objects = tuple(
        SceneObject(shape=s, colour=c, size=z, x=round(x, 4), y=round(y, 4))
        for (s, c), z, (x, y) in zip(kinds, sizes, centres, strict=True)
    )
    return Scene(background=rng.choice(list(BACKGROUNDS)), objects=objects)


def check_config(cfg: WorldConfig) -> None:
    """Raise ConfigError when ``cfg``'s inventories cannot give its scenes."""
    if cfg.n_colours * cfg.n_shapes < cfg.max_objects or not (1 <= cfg.min_objects <= cfg.max_objects):
        raise ConfigError(
            f"WorldConfig: {cfg.n_colours} colours x {cfg.n_shapes} shapes cannot give {cfg.max_objects} distinct "
            f"objects per scene (min_objects={cfg.min_objects}); raise the inventories or lower max_objects"
        )


def sample_scene(rng: random.Random, cfg: WorldConfig) -> Scene:
    """A scene of the world ``cfg`` describes: ``cfg.min_objects..max_objects`` objects of its first
    ``n_colours`` colours and ``n_shapes`` shapes (the generator interface)."""
    return random_scene(
        rng,
        cfg.max_objects,
        cfg.min_objects,
        list(COLOURS)[: cfg.n_colours],
        list(SHAPE_WORDS)[: cfg.n_shapes],
    )


def misdescribe(scene: Scene, rng: random.Random, cfg: WorldConfig) -> Scene:
    """The scene as a careless annotator saw it: one object's colour or shape changed to another of ``cfg``'s
    inventories (still distinct from the other objects), for ``WorldConfig.caption_noise``."""
    i = rng.randrange(len(scene.objects))
    o = scene.objects[i]
    taken = {(p.shape, p.colour) for p in scene.objects}
    options = [(s, o.colour) for s in list(SHAPE_WORDS)[: cfg.n_shapes] if (s, o.colour) not in taken]
    options += [(o.shape, c) for c in list(COLOURS)[: cfg.n_colours] if (o.shape, c) not in taken]
    shape, colour = rng.choice(options)
    objects = list(scene.objects)
    objects[i] = SceneObject(shape, colour, o.size, o.x, o.y)
    return Scene(background=scene.background, objects=tuple(objects))


def relayout(scene: Scene, rng: random.Random) -> Scene:
    """The same objects (shape, colour, size) at new positions: the T2I simulation of "render this caption again"."""
    centres = _place(rng, [o.size for o in scene.objects])
    objects = tuple(
        SceneObject(o.shape, o.colour, o.size, round(x, 4), round(y, 4))
        for o, (x, y) in zip(scene.objects, centres, strict=True)
    )
    return Scene(background=scene.background, objects=objects)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene to an RGB image of ``size`` x ``size`` pixels.

    With ``rng``, colours get a small random shade change (±20 per channel, ±10 for the background) so that a colour word names a region of
    colour space rather than one exact RGB value.
    """

    def jitter(rgb: tuple[int, int, int], amount: int = 20) -> tuple[int, int, int]:
        if rng is None:
            return rgb
        return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]

    img = Image.new("RGB", (size, size), jitter(BACKGROUNDS[scene.background], 10))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, RADIUS_FRACTION[o.size] * size
        fill = jitter(COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = 0.85 * r
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "cross":
            w = 0.33 * r
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, r), fill=fill)
    return img


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``: 'left of', 'right of', 'above' or 'below'."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _noun_phrase(o: SceneObject, rng: random.Random, p_size: float = 0.6, article: bool = True) -> str:
    words = []
    if rng.random() < p_size:
        words.append(rng.choice(SIZE_WORDS[o.size]))
    words.append(rng.choice(COLOUR_WORDS[o.colour]))
    words.append(rng.choice(SHAPE_WORDS[o.shape]))
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}" if article else phrase


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _background_phrase(scene: Scene, rng: random.Random) -> str:
    return f"on a {rng.choice(BACKGROUND_WORDS[scene.background])} {rng.choice(['background', 'backdrop'])}"


def describe(scene: Scene, rng: random.Random) -> str:
    """One ground-truth-style caption of the scene, sampled from the grammar.

    Captions vary the synonyms, the word order (which object leads a relation), optional details (size, background)
    and the template, so five samples of one scene read like five annotators.
    """
    objs = list(scene.objects)
    rng.shuffle(objs)
    if len(objs) == 1:
        np = _noun_phrase(objs[0], rng)
        template = rng.randrange(4)
        if template == 0:
            text = np
        elif template == 1:
            text = f"{np} {_background_phrase(scene, rng)}"
        elif template == 2:
            text = f"there is {np} in the {rng.choice(['picture', 'image'])}"
        else:
            text = f"a single {rng.choice(COLOUR_WORDS[objs[0].colour])} {rng.choice(SHAPE_WORDS[objs[0].shape])}"
        return text
    a, b = objs[0], objs[1]
    rel = rng.choice(RELATION_WORDS[relation(a, b)])
    template = rng.randrange(4)
    if template == 0:
        text = f"{_noun_phrase(a, rng)} {rel} {_noun_phrase(b, rng)}"
    elif template == 1:
        text = f"{NUMBER_WORDS[len(objs)]} {rng.choice(['shapes', 'objects'])}: " + _join(
            [_noun_phrase(o, rng) for o in objs]
        )
    elif template == 2:
        text = _join([_noun_phrase(o, rng) for o in objs]) + " " + _background_phrase(scene, rng)
    else:
        text = f"{_noun_phrase(a, rng)} {rel} {_noun_phrase(b, rng)}"
    if len(objs) >= 3 and template in (0, 3):
        text += f" {rng.choice(['with', 'and'])} " + _join([_noun_phrase(o, rng) for o in objs[2:]])
    return text


def oracle_caption(scene: Scene, rng: random.Random) -> str:
    """The I2T simulation: a captioner describing the image in its own style ("a photo of ..."), which names every
    object by its canonical words but sometimes omits sizes, relations or a third object, as real captioners do."""
    objs = sorted(scene.objects, key=lambda o: o.x)  # a captioner reads left to right
    if len(objs) == 3 and rng.random() < 0.3:
        objs = objs[:2]
    parts = []
    for o in objs:
        size = f"{o.size} " if rng.random() < 0.5 else ""
        phrase = f"{size}{o.colour} {o.shape}"
        parts.append(f"{_article(phrase)} {phrase}")
    lead = rng.choice(["a photo of", "an image of", "a picture showing"])
    text = f"{lead} {_join(parts)}"
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return text
