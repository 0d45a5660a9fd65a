"""The calibrated ("rich") synthetic world: scenes whose captions, like Flickr30K's, carry redundant detail.

Why a second world: in the classic world (2-4 objects in 6 colours, 5-8-word captions) any one content word names
the scene, so replacing one colour word swaps the caption to another scene and every text attack is nearly total
(flip rate ~98 % vs 28-39 % for CLIP ViT-B/16 on Flickr30K). Here a scene has more to say and a caption says
more of it, so one changed word *moves* a caption without making it describe another image:

* **objects**: 2-3 per scene (the preset's ``max_objects``), each shape (6) x colour (7) x pattern (plain, striped,
  dotted) x size (small, large); small objects are the "distractors" that captions mention only half the time;
* **context**: the backdrop colour (4), the ground strip (grass, sand, water, snow, or none), the lighting
  (bright, dim, warm) and the weather (clear, rain, snow, fog), all visible in the image;
* **captions**: 15 words on average (9-25; Flickr30K's mean is ~12), from five templates that mention the salient objects with some of
  their attributes, a relation, a count and one or two context phrases; synonyms vary the words ("a striped crimson
  disc on the sand in dim light", "two shapes on a beach at dusk: ...").

The module provides the generator interface of :mod:`mat_lightning.synthetic` (``sample_scene``, ``render``,
``describe``, ``oracle_caption``, ``relayout``, ``scene_from_json``, ``thesaurus``); the data set on disk has the
same Karpathy layout as the classic world's.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: Bump when the output changes for the same config (it is part of the world's digest, hence of its caches' names).
VERSION = 2

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary: concept -> the words that may name it (first = canonical; the thesaurus maps each to the others).

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 200),
    "orange": (245, 135, 25),
    "pink": (245, 125, 190),
}
COLOUR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald"],
    "blue": ["blue", "azure", "cobalt"],
    "yellow": ["yellow", "golden", "lemon"],
    "purple": ["purple", "violet"],
    "orange": ["orange", "amber", "tangerine"],
    "pink": ["pink", "rose"],
}
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "ball"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "pyramid"],
    "cross": ["cross", "plus"],
    "star": ["star", "starburst"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
PATTERN_WORDS: dict[str, list[str]] = {
    "plain": ["plain", "solid"],
    "striped": ["striped", "stripy", "banded"],
    "dotted": ["dotted", "spotted", "speckled"],
}
SIZE_WORDS: dict[str, list[str]] = {
    "small": ["small", "tiny", "little"],
    "large": ["large", "big", "huge"],
}
BACKDROPS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 22),
    "white": (236, 236, 232),
    "gray": (125, 125, 130),
    "beige": (200, 180, 140),
}
BACKDROP_WORDS: dict[str, list[str]] = {
    "black": ["black", "dark"],
    "white": ["white", "pale"],
    "gray": ["gray", "grey"],
    "beige": ["beige", "tan"],
}
GROUNDS: dict[str, tuple[int, int, int] | None] = {
    "none": None,
    "grass": (55, 120, 40),
    "sand": (222, 196, 130),
    "water": (40, 95, 170),
    "snow": (245, 248, 255),
}
GROUND_PHRASES: dict[str, list[str]] = {
    "grass": ["on the grass", "on a lawn", "on green grass"],
    "sand": ["on the sand", "on a beach", "on sandy ground"],
    "water": ["on the water", "over water", "on a lake"],
    "snow": ["on the snow", "on snowy ground", "in the snow"],
}
LIGHTS: dict[str, tuple[float, float, float]] = {
    "bright": (1.0, 1.0, 1.0),
    "dim": (0.5, 0.5, 0.55),
    "warm": (1.0, 0.78, 0.5),
}
LIGHT_PHRASES: dict[str, list[str]] = {
    "bright": ["in bright light", "in sunlight", "brightly lit"],
    "dim": ["in dim light", "in the dark", "in low light"],
    "warm": ["at sunset", "at dusk", "in warm light"],
}
WEATHERS = ("clear", "rain", "snow", "fog")
WEATHER_PHRASES: dict[str, list[str]] = {
    "clear": ["on a clear day", "under a clear sky"],
    "rain": ["in the rain", "on a rainy day", "in heavy rain"],
    "snow": ["in falling snow", "while it snows", "in a snowfall"],
    "fog": ["in fog", "on a foggy day", "in the mist"],
}
RELATION_WORDS: dict[str, list[str]] = {
    "left of": ["left of", "to the left of", "beside"],
    "right of": ["right of", "to the right of", "beside"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
RADIUS = {"small": 0.09, "large": 0.16}  # of the image side
GROUND_TOP = 0.74  # the ground strip covers the image below this height (fraction of the side)
P_MENTION = {"large": 1.0, "small": 0.5}  # salience: how often a caption names an object


def thesaurus() -> dict[str, list[str]]:
    """Word -> its synonyms in this world (single words only: EDA and the synonym attack replace single words)."""
    out: dict[str, list[str]] = {}
    for groups in (COLOUR_WORDS, SHAPE_WORDS, PATTERN_WORDS, SIZE_WORDS, BACKDROP_WORDS):
        for words in groups.values():
            for w in words:
                if "-" not in w:
                    out[w] = [s for s in words if s != w and "-" not in s]
    extra = {
        "shapes": ["objects", "figures"],
        "objects": ["shapes", "figures"],
        "figures": ["shapes", "objects"],
        "picture": ["image", "photo"],
        "image": ["picture", "photo"],
        "photo": ["picture", "image"],
        "background": ["backdrop"],
        "backdrop": ["background"],
        "over": ["above"],
        "above": ["over"],
        "under": ["below", "beneath"],
        "below": ["under", "beneath"],
        "beneath": ["below", "under"],
        "dusk": ["sunset"],
        "sunset": ["dusk"],
        "lawn": ["grass"],
        "grass": ["lawn"],
        "beach": ["sand"],
        "lake": ["water"],
    }
    for w, syns in extra.items():
        out.setdefault(w, syns)
    return {w: s for w, s in out.items() if s}


# ---------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class RichObject:
    """One object; ``x``, ``y``: centre in [0, 1] image coordinates (y grows downwards)."""

    shape: str
    colour: str
    pattern: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class RichScene:
    backdrop: str
    ground: str
    light: str
    weather: str
    objects: tuple[RichObject, ...]

    def to_json(self) -> dict:
        return {
            "backdrop": self.backdrop,
            "ground": self.ground,
            "light": self.light,
            "weather": self.weather,
            "objects": [asdict(o) for o in self.objects],
        }


def scene_from_json(d: dict) -> RichScene:
    objects = tuple(RichObject(**o) for o in d["objects"])
    return RichScene(d["backdrop"], d["ground"], d["light"], d["weather"], objects)


def _place(rng: random.Random, sizes: list[str], tries: int = 300) -> list[tuple[float, float]]:
    """Centres for objects of the given sizes, inside the frame and apart (a little overlap at worst)."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        r = RADIUS[size]
        best, best_gap = (0.5, 0.5), -1.0
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            gap = min(
                (math.hypot(x - cx, y - cy) - r - RADIUS[sizes[j]] for j, (cx, cy) in enumerate(centres)),
                default=1.0,
            )
            if gap > 0.03:
                best = (x, y)
                break
            if gap > best_gap:
                best, best_gap = (x, y), gap
        centres.append(best)
    return centres


def sample_scene(rng: random.Random, cfg: Any) -> RichScene:
    """A random scene: ``cfg.min_objects``..``cfg.max_objects`` objects with distinct (shape, colour, pattern),
    at least one of them large (every image has a subject)."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n:
        kind = (rng.choice(list(SHAPE_WORDS)), rng.choice(list(COLOURS)), rng.choice(list(PATTERN_WORDS)))
        if kind not in kinds:
            kinds.append(kind)
    sizes = [rng.choice(list(SIZE_WORDS)) for _ in range(n)]
    if all(s == "small" for s in sizes):
        sizes[0] = "large"
    centres = _place(rng, sizes)
    objects = tuple(
        RichObject(s, c, p, z, round(x, 4), round(y, 4))
        for (s, c, p), z, (x, y) in zip(kinds, sizes, centres, strict=True)
    )
    context = (
        rng.choice(list(BACKDROPS)),
        rng.choice(list(GROUNDS)),
        rng.choice(list(LIGHTS)),
        rng.choice(WEATHERS),
    )
    return RichScene(*context, objects)


def misdescribe(scene: RichScene, rng: random.Random, cfg: Any = None) -> RichScene:
    """The scene as a careless annotator saw it: one object's shape, colour or pattern, or one context attribute
    (backdrop, ground, light, weather), changed to another value, for ``WorldConfig.caption_noise``."""
    i = rng.randrange(len(scene.objects) + 1)
    if i == len(scene.objects):  # the context
        field = rng.choice(["backdrop", "ground", "light", "weather"])
        values = {
            "backdrop": list(BACKDROPS),
            "ground": list(GROUNDS),
            "light": list(LIGHTS),
            "weather": WEATHERS,
        }
        new = rng.choice([v for v in values[field] if v != getattr(scene, field)])
        return replace(scene, **{field: new})
    o = scene.objects[i]
    taken = {(p.shape, p.colour, p.pattern) for p in scene.objects}
    options = [(s, o.colour, o.pattern) for s in SHAPE_WORDS]
    options += [(o.shape, c, o.pattern) for c in COLOURS]
    options += [(o.shape, o.colour, p) for p in PATTERN_WORDS]
    shape, colour, pattern = rng.choice([k for k in options if k not in taken])
    objects = list(scene.objects)
    objects[i] = replace(o, shape=shape, colour=colour, pattern=pattern)
    return replace(scene, objects=tuple(objects))


def relayout(scene: RichScene, rng: random.Random) -> RichScene:
    """Same objects and context at new positions: the T2I simulation of "render this caption again"."""
    centres = _place(rng, [o.size for o in scene.objects])
    objects = tuple(
        RichObject(o.shape, o.colour, o.pattern, o.size, round(x, 4), round(y, 4))
        for o, (x, y) in zip(scene.objects, centres, strict=True)
    )
    return RichScene(scene.backdrop, scene.ground, scene.light, scene.weather, objects)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering (numpy: shape masks from PIL, patterns and lighting as array operations)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    elif shape == "triangle":
        draw.polygon(
            [
                (cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ],
            fill=255,
        )
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=255)
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.48 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=255)
    else:
        raise ValueError(shape)
    return np.asarray(img) > 127


def _pattern_mask(pattern: str, size: int, phase: int) -> np.ndarray:
    """Where the pattern's second tone goes (True) on a ``size`` x ``size`` grid."""
    yy, xx = np.mgrid[:size, :size]
    if pattern == "striped":
        return ((yy + phase) // 2) % 2 == 0
    if pattern == "dotted":
        return ((yy + phase) % 5 < 2) & ((xx + phase) % 5 < 2)
    return np.zeros((size, size), dtype=bool)


def render(scene: RichScene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene to an RGB image of ``size`` x ``size`` pixels.

    With ``rng``, colours get a small random shade change (±18 per channel, ±8 for backdrop and ground) so a colour
    word names a region of colour space, and patterns a random phase.
    """

    def jitter(rgb: tuple[int, int, int], amount: int) -> np.ndarray:
        v = np.array(rgb, dtype=np.float32)
        if rng is not None:
            v += np.array([rng.randint(-amount, amount) for _ in range(3)], dtype=np.float32)
        return v

    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = jitter(BACKDROPS[scene.backdrop], 8)
    ground = GROUNDS[scene.ground]
    top = int(round(GROUND_TOP * size))
    if ground is not None:
        canvas[top:] = jitter(ground, 8)
        yy, xx = np.mgrid[top:size, :size]
        texture = {
            "grass": (xx % 3 == 0) & (yy % 2 == 0),
            "water": (yy - top) % 4 == 1,
            "sand": (xx + 2 * yy) % 5 == 0,
        }
        if scene.ground in texture:  # a texture, so the strip is a surface and not just another colour
            canvas[top:][texture[scene.ground]] *= 0.8
    for o in sorted(scene.objects, key=lambda o: -RADIUS[o.size]):  # small ones on top
        mask = _shape_mask(o.shape, size, o.x * size, o.y * size, RADIUS[o.size] * size)
        colour = jitter(COLOURS[o.colour], 18)
        second = _pattern_mask(o.pattern, size, rng.randint(0, 5) if rng else 0)
        if o.pattern == "striped":
            tone = colour * 0.35
        elif o.pattern == "dotted":
            tone = np.full(3, 245.0, dtype=np.float32)
        else:
            tone = colour
        canvas[mask] = colour
        canvas[mask & second] = tone
    yy, xx = np.mgrid[:size, :size]
    phase = rng.randint(0, 7) if rng else 0
    if scene.weather == "rain":  # light diagonal streaks over everything
        canvas[((xx + yy + phase) % 8 == 0) & ((yy // 3) % 2 == 0)] = (200, 210, 235)
    elif scene.weather == "snow":  # scattered white flakes
        canvas[((xx * 7 + yy * 13 + phase) % 23 == 0)] = (250, 250, 250)
    elif scene.weather == "fog":  # a haze: everything pulled towards light gray
        canvas = 0.55 * canvas + 0.45 * np.array((190, 190, 195), dtype=np.float32)
    canvas *= np.array(LIGHTS[scene.light], dtype=np.float32)
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def relation(a: RichObject, b: RichObject) -> str:
    """Where ``a`` is relative to ``b``, by the dominant axis."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _noun_phrase(o: RichObject, rng: random.Random, detail: float) -> str:
    """``[size] [pattern] colour shape`` with an article; ``detail`` scales how often size and pattern are named."""
    words = []
    if rng.random() < 0.3 * detail:
        words.append(rng.choice(SIZE_WORDS[o.size]))
    if rng.random() < (0.75 if o.pattern != "plain" else 0.3) * detail:
        words.append(rng.choice(PATTERN_WORDS[o.pattern]))
    words.append(rng.choice(COLOUR_WORDS[o.colour]))
    words.append(rng.choice(SHAPE_WORDS[o.shape]))
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}"


def _context(scene: RichScene, rng: random.Random, n: int) -> list[str]:
    """Up to ``n`` context phrases (ground, light, weather, backdrop) in random order."""
    options = []
    if scene.ground != "none":
        options.append(rng.choice(GROUND_PHRASES[scene.ground]))
    options.append(rng.choice(LIGHT_PHRASES[scene.light]))
    options.append(rng.choice(WEATHER_PHRASES[scene.weather]))
    bd = rng.choice(BACKDROP_WORDS[scene.backdrop])
    options.append(
        rng.choice([f"against a {bd} {rng.choice(['background', 'backdrop'])}", f"by a {bd} wall"])
    )
    rng.shuffle(options)
    return options[:n]


def _mentioned(scene: RichScene, rng: random.Random) -> list[RichObject]:
    """The objects a caption names: large ones always, small ones half the time; at least two (or all), at most three."""
    objs = sorted(scene.objects, key=lambda o: -RADIUS[o.size])
    named = [o for o in objs if rng.random() < P_MENTION[o.size]]
    for o in objs:
        if len(named) >= min(2, len(objs)):
            break
        if o not in named:
            named.append(o)
    named = named[:3]
    rng.shuffle(named)
    return named


def describe(scene: RichScene, rng: random.Random) -> str:
    """One ground-truth-style caption (~12 words), sampled from the grammar: five samples of one scene read like five
    annotators (different words, order, details and context)."""
    objs = _mentioned(scene, rng)
    n_ctx = rng.choice([1, 1, 2, 2])
    ctx = _context(scene, rng, n_ctx)
    template = rng.randrange(5)
    if template in (0, 1):  # relation-led: "a striped red star left of a blue disc, and a ..., on the sand"
        a, b = objs[0], objs[1]
        text = f"{_noun_phrase(a, rng, 1.0)} {rng.choice(RELATION_WORDS[relation(a, b)])} {_noun_phrase(b, rng, 1.0)}"
        if len(objs) > 2:
            text += f" {rng.choice(['with', 'and'])} " + _join([_noun_phrase(o, rng, 0.5) for o in objs[2:]])
        text = " ".join([text, *ctx])
    elif template == 2:  # count-led: "three shapes on a beach: ..."
        count = len(scene.objects)
        lead = " ".join([NUMBER_WORDS[count], rng.choice(["shapes", "objects", "figures"]), *ctx[:1]])
        text = f"{lead}: " + _join([_noun_phrase(o, rng, 0.6) for o in objs])
    elif template == 3:  # context-led: "in dim light, a ... and a ..."
        text = ", ".join(
            [*(ctx or _context(scene, rng, 1)), _join([_noun_phrase(o, rng, 0.8) for o in objs])]
        )
    else:  # "there is/are ..."
        text = " ".join(["there are", _join([_noun_phrase(o, rng, 0.8) for o in objs]), *ctx])
    return text


def oracle_caption(scene: RichScene, rng: random.Random) -> str:
    """The I2T simulation: a captioner in its own style ("a photo of ..."), canonical words, reading left to right;
    it names the salient objects with colour and pattern, and sometimes the ground or the light."""
    objs = sorted((o for o in scene.objects if o.size != "small" or rng.random() < 0.5), key=lambda o: o.x)
    parts = []
    for o in objs:
        pattern = f"{o.pattern} " if o.pattern != "plain" else ""
        size = f"{o.size} " if rng.random() < 0.4 else ""
        phrase = f"{size}{pattern}{o.colour} {o.shape}"
        parts.append(f"{_article(phrase)} {phrase}")
    text = f"{rng.choice(['a photo of', 'an image of', 'a picture showing'])} {_join(parts)}"
    if scene.ground != "none" and rng.random() < 0.6:
        text += f" on the {scene.ground}"
    if rng.random() < 0.5:
        text += {"bright": " in bright light", "dim": " in dim light", "warm": " at sunset"}[scene.light]
    return text
