"""The embedded "shapes" dataset: scene specs, captions and deterministic renders (system §4).

A sample is drawn from its own RNG `default_rng([seed, index])`, so any sample can be made alone,
in any process, and is the same bytes every time. A *spec* describes the whole image the way the
caption states it (GenEval-style categories); the judge (`bdt.eval.judge`) checks images against
the same spec, and renders its shape templates with `shape_coverage` from here, so the two
never drift.

Spec format:
    {"category": str, "groups": [{"shape": str, "color": str | None, "count": int}, ...],
     "relation": None | {"type": "left_of" | "right_of" | "above" | "below", "a": int, "b": int}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
# Saturated colours ~40 degrees apart in OKLab hue (red 22, orange 62, yellow 101, green 145,
# cyan 205, blue 266, purple 309, pink 345), so blends with a neutral background keep their hue.
COLORS = {
    "red": (220, 20, 50), "orange": (250, 145, 10), "yellow": (240, 215, 20),
    "green": (40, 170, 60), "cyan": (20, 200, 215), "blue": (30, 70, 220),
    "purple": (150, 50, 210), "pink": (245, 95, 190),
}
# Neutral, low-chroma backgrounds: objects separate from them by chroma alone.
BACKGROUNDS = {
    "white": (248, 248, 248), "light_gray": (205, 205, 205), "dark_gray": (62, 62, 62),
    "black": (12, 12, 12), "beige": (236, 228, 210),
}
CATEGORIES = ("single_object", "colors", "two_objects", "counting", "position", "color_attr")
RELATIONS = ("left_of", "right_of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Objects a spec may ask for: far more than fit an image (each spans >= MIN_SIZE_FRAC of its
# short side); layout and the judge list every wanted object, and 10**30 exhausted memory.
MAX_OBJECTS = 100

SUPERSAMPLE = 4  # anti-aliasing: draw at 4x, then average 4x4 blocks (exact area coverage)
MIN_SIZE_FRAC = 0.22  # smallest object = 22% of the short side: >= 14 px in a 64 px image
MAX_SIZE_FRAC = {1: 0.55, 2: 0.42, 3: 0.34, 4: 0.3}
MIN_SIZE_PX = 14.0
# Thin shapes cover less of their box (star 35%, triangle 43%, circle 79%): draw them larger so
# their arms and apex stay readable at the minimum size.
SIZE_BOOST = {"star": 1.25, "triangle": 1.1}
DOMINANCE = 1.5  # position pairs: |offset on the stated axis| >= 1.5 x |offset on the other|
MIN_LUMA_CONTRAST = 30.0  # object vs background, in 0..255 luma (see _contrasting_backgrounds)
MIN_PX, MAX_PX = 32, 4096


@dataclass
class ShapesConfig:
    """Options of `bdt data shapes` (saved as config.yaml beside the shards)."""

    out: str = "???"
    num: int = 1000
    sizes: list[str] = field(default_factory=lambda: ["256"])
    per_shard: int = 1000
    seed: int = 0
    format: str = "jpg"
    jpeg_quality: int = 95
    workers: int = 1


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '384x256' -> (384, 256) as (width, height)."""
    parts = str(text).lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2):
        raise ValueError(f"size '{text}' is not S or WxH (e.g. 256 or 384x256)")
    w, h = (dims[0], dims[0]) if len(dims) == 1 else dims
    if not (MIN_PX <= w <= MAX_PX and MIN_PX <= h <= MAX_PX):
        raise ValueError(f"size '{text}': width and height must be in [{MIN_PX}, {MAX_PX}] px")
    return w, h


# ---------------------------------------------------------------------------------------------
# Geometry: every shape is a polygon whose bounding box has its longer side 1, centred on 0.

def _unit_polygon(shape: str) -> np.ndarray:
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif shape == "triangle":  # equilateral, apex up (image y grows downwards)
        pts = np.array([[0, -1], [math.sqrt(3) / 2, 0.5], [-math.sqrt(3) / 2, 0.5]])
    elif shape == "star":  # 5 points, apex up; inner radius 0.47 (not the classic 0.38) keeps
        # the arms readable at the minimum size
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.47)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "cross":  # plus sign with arms one third of the width
        a, b = 1.0, 1.0 / 3.0
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
    else:
        raise ValueError(f"unknown shape '{shape}' (expected one of {', '.join(SHAPES)})")
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) / (hi - lo).max()


UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
# (width, height) of each shape's bounding box for size 1.
UNIT_EXTENT = {s: tuple(p.max(0) - p.min(0)) for s, p in UNIT_POLYGONS.items()}


def _coverage(shape: str, cx: float, cy: float, size: float, x0: int, y0: int, w: int,
              h: int) -> np.ndarray:
    """Area coverage in [0, 1] of `shape` (centre cx, cy; size px) on the pixel window at x0, y0."""
    ss = SUPERSAMPLE
    canvas = Image.new("L", (w * ss, h * ss), 0)
    pts = (UNIT_POLYGONS[shape] * size + [cx - x0, cy - y0]) * ss
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0


def shape_coverage(shape: str, size: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` filling a size x size canvas (the judge's templates)."""
    return _coverage(shape, size / 2, size / 2, size, 0, 0, size, size)


# ---------------------------------------------------------------------------------------------
# Specs and captions

def sample_spec(rng: np.random.Generator, category: str) -> dict:
    """A random spec of `category` (distinct shapes, so its caption is unambiguous)."""
    color_names = list(COLORS)
    shapes = [str(s) for s in rng.permutation(SHAPES)[:2]]
    colors = [str(c) for c in rng.permutation(color_names)[:2]]
    relation = None
    if category == "single_object":
        groups = [{"shape": shapes[0], "color": None, "count": 1}]
    elif category == "colors":
        groups = [{"shape": shapes[0], "color": colors[0], "count": 1}]
    elif category == "two_objects":
        groups = [{"shape": s, "color": None, "count": 1} for s in shapes]
    elif category == "counting":
        color = colors[0] if rng.random() < 0.5 else None
        groups = [{"shape": shapes[0], "color": color, "count": int(rng.integers(2, 5))}]
    elif category == "position":
        with_color = rng.random() < 0.5
        groups = [{"shape": s, "color": c if with_color else None, "count": 1}
                  for s, c in zip(shapes, colors)]
        relation = {"type": str(rng.choice(RELATIONS)), "a": 0, "b": 1}
    elif category == "color_attr":
        groups = [{"shape": s, "color": c, "count": 1} for s, c in zip(shapes, colors)]
    else:
        raise ValueError(f"unknown category '{category}' (expected one of {', '.join(CATEGORIES)})")
    return {"category": category, "groups": groups, "relation": relation}


def check_spec(spec: dict) -> None:
    """Raise ValueError naming the first problem of a spec (the format in the module docstring)."""
    try:
        groups, relation = spec["groups"], spec.get("relation")
        if spec["category"] not in CATEGORIES:
            raise ValueError(f"category '{spec['category']}' is not one of {', '.join(CATEGORIES)}")
        if not groups:
            raise ValueError("no groups")
        for g in groups:
            if g["shape"] not in SHAPES:
                raise ValueError(f"shape '{g['shape']}' is not one of {', '.join(SHAPES)}")
            if g["color"] is not None and g["color"] not in COLORS:
                raise ValueError(f"color '{g['color']}' is not one of {', '.join(COLORS)}")
            if type(g["count"]) is not int or g["count"] < 1:  # a JSON true is no count
                raise ValueError(f"count must be a positive integer, got {g['count']!r}")
        total = sum(g["count"] for g in groups)
        if total > MAX_OBJECTS:
            raise ValueError(f"asks for {total} objects; a spec holds at most {MAX_OBJECTS}")
        if relation is not None:
            if relation["type"] not in RELATIONS:
                raise ValueError(
                    f"relation '{relation['type']}' is not one of {', '.join(RELATIONS)}")
            ends = [relation["a"], relation["b"]]
            if (ends[0] == ends[1]
                    or not all(isinstance(e, int) and 0 <= e < len(groups) for e in ends)
                    or any(groups[e]["count"] != 1 for e in ends)):
                raise ValueError(
                    f"relation must join two different single-object groups, got {ends}")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed spec {spec!r}: missing or wrong {exc}") from None


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(group: dict) -> str:
    """'red circle', 'circle', 'three blue stars'-style noun phrase without the article."""
    shape = group["shape"] if group["count"] == 1 else PLURALS[group["shape"]]
    return f"{group['color']} {shape}" if group["color"] else shape


_RELATION_TEMPLATES = {
    "left_of": ["{A} to the left of {B}", "{A} on the left and {B} on the right",
                "{A} left of {B}"],
    "right_of": ["{A} to the right of {B}", "{A} on the right and {B} on the left",
                 "{A} right of {B}"],
    "above": ["{A} above {B}", "{A} on the top and {B} on the bottom", "{A} over {B}"],
    "below": ["{A} below {B}", "{A} on the bottom and {B} on the top", "{A} under {B}"],
}


def caption(rng: np.random.Generator, spec: dict) -> str:
    """Render `spec` as English with one of several templates per category."""
    groups, category = spec["groups"], spec["category"]
    prefix = str(rng.choice(["", "", "a photo of ", "an image of "]))
    if category in ("single_object", "colors"):
        phrase = _noun(groups[0])
        body = str(rng.choice([_with_article(phrase), "one " + phrase, "a single " + phrase]))
    elif category == "counting":
        word = NUMBER_WORDS[groups[0]["count"]]
        body = str(rng.choice(["{n} {x}", "exactly {n} {x}"])).format(n=word, x=_noun(groups[0]))
    elif category == "position":
        template = str(rng.choice(_RELATION_TEMPLATES[spec["relation"]["type"]]))
        a, b = (groups[spec["relation"][k]] for k in ("a", "b"))
        body = template.format(A=_with_article(_noun(a)), B=_with_article(_noun(b)))
    else:  # two_objects, color_attr: a conjunction of single objects
        nouns = [_noun(g) for g in groups]
        if rng.random() < 0.5:
            body = " and ".join(_with_article(n) for n in nouns)
        else:
            body = " and ".join("one " + n for n in nouns)
    return prefix + body


# ---------------------------------------------------------------------------------------------
# Layout and rendering

def relation_holds(kind: str, a: tuple[float, float], b: tuple[float, float],
                   dominance: float) -> bool:
    """Does object at `a` stand in relation `kind` to `b`, its axis dominating by `dominance`?"""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    main, other = {"left_of": (dx, dy), "right_of": (-dx, dy),
                   "above": (dy, dx), "below": (-dy, dx)}[kind]
    return main > 0 and abs(main) >= dominance * abs(other)


def layout(rng: np.random.Generator, spec: dict, width: int, height: int) -> list[dict]:
    """Place every object of `spec` without overlap (bounding boxes kept a gap apart)."""
    check_spec(spec)
    wanted = []  # (group index, shape, colour or None)
    for gi, g in enumerate(spec["groups"]):
        wanted += [(gi, g["shape"], g["color"])] * g["count"]
    n, short = len(wanted), min(width, height)
    gap = max(1.5, 0.05 * short)
    lo = max(MIN_SIZE_FRAC * short, min(MIN_SIZE_PX, 0.3 * short))
    hi = max(lo, MAX_SIZE_FRAC[min(n, 4)] * short)
    relation = spec.get("relation")
    for attempt in range(200):
        shrink = 1.0 - 0.4 * attempt / 200  # crowded scenes: retry with smaller objects
        objects: list[dict] = []
        for gi, shape, color in wanted:
            size = float(rng.uniform(lo, hi)) * shrink * SIZE_BOOST.get(shape, 1.0)
            ew, eh = (e * size for e in UNIT_EXTENT[shape])
            for _ in range(50):
                cx = float(rng.uniform(ew / 2 + gap, width - ew / 2 - gap))
                cy = float(rng.uniform(eh / 2 + gap, height - eh / 2 - gap))
                box = (cx - ew / 2, cy - eh / 2, cx + ew / 2, cy + eh / 2)
                if any(box[0] < o["bbox"][2] + gap and o["bbox"][0] < box[2] + gap and
                       box[1] < o["bbox"][3] + gap and o["bbox"][1] < box[3] + gap
                       for o in objects):
                    continue
                if relation and gi in (relation["a"], relation["b"]):
                    where = {o["group"]: o["center"] for o in objects} | {gi: (cx, cy)}
                    a, b = where.get(relation["a"]), where.get(relation["b"])
                    if a and b and not relation_holds(relation["type"], a, b, DOMINANCE):
                        continue
                break
            else:
                break
            name = color if color is not None else str(rng.choice(list(COLORS)))
            objects.append({"shape": shape, "color": name, "group": gi, "size": size,
                            "center": (cx, cy), "bbox": box})
        if len(objects) == n:
            return objects
    raise RuntimeError(f"could not place {n} objects in {width}x{height}")


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # BT.601, as JPEG's Y channel


def _contrasting_backgrounds(colors: set[str]) -> list[str]:
    """Backgrounds whose luma differs from every object colour by >= MIN_LUMA_CONTRAST.

    JPEG keeps chroma at half resolution (4:2:0) and quantises it hard; an object with no luma
    contrast (yellow on light gray, blue on dark gray) keeps its outline only in chroma and a
    20 px star turns into a blob. Any other colour/background pair stays possible.
    """
    ok = [b for b, rgb in BACKGROUNDS.items()
          if all(abs(_luma(rgb) - _luma(COLORS[c])) >= MIN_LUMA_CONTRAST for c in colors)]
    return ok or list(BACKGROUNDS)


def render(rng: np.random.Generator, objects: list[dict], width: int, height: int
           ) -> tuple[Image.Image, str]:
    """Draw `objects` on a random neutral background; returns (RGB image, background name)."""
    bg_name = str(rng.choice(_contrasting_backgrounds({o["color"] for o in objects})))
    base = np.array(BACKGROUNDS[bg_name], np.float32)
    img = np.broadcast_to(base, (height, width, 3)).copy()
    if rng.random() < 0.5:  # subtle linear lightness gradient in a random direction
        angle, amp = rng.uniform(0, 2 * np.pi), rng.uniform(8, 24)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx / width - 0.5) * np.cos(angle) + (yy / height - 0.5) * np.sin(angle)
        img += (amp * t)[..., None]
    for obj in objects:
        rgb = np.clip(np.array(COLORS[obj["color"]]) + rng.integers(-10, 11, 3), 0, 255)
        x0, y0, x1, y1 = obj["bbox"]
        px0, py0 = max(0, int(x0) - 1), max(0, int(y0) - 1)
        px1, py1 = min(width, int(math.ceil(x1)) + 1), min(height, int(math.ceil(y1)) + 1)
        alpha = _coverage(obj["shape"], *obj["center"], obj["size"], px0, py0,
                          px1 - px0, py1 - py0)[..., None]
        patch = img[py0:py1, px0:px1]
        img[py0:py1, px0:px1] = patch * (1 - alpha) + rgb.astype(np.float32) * alpha
    if rng.random() < 0.5:  # mild sensor-like noise
        img += rng.normal(0, rng.uniform(1, 4), img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), bg_name


def make_sample(seed: int, index: int, sizes: list[tuple[int, int]]
                ) -> tuple[Image.Image, str, dict]:
    """Sample `index` of the dataset with `seed`: (image, caption, metadata with spec + objects)."""
    rng = np.random.default_rng([seed, index])
    width, height = sizes[int(rng.integers(len(sizes)))]
    spec = sample_spec(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
    text = caption(rng, spec)
    objects = layout(rng, spec, width, height)
    image, background = render(rng, objects, width, height)
    meta = {
        "spec": spec, "caption": text, "width": width, "height": height,
        "background": background, "seed": seed, "index": index,
        "objects": [{"shape": o["shape"], "color": o["color"], "group": o["group"],
                     "bbox": [round(float(v), 2) for v in o["bbox"]],
                     "center": [round(float(v), 2) for v in o["center"]]} for o in objects],
    }
    return image, text, meta
