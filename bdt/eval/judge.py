"""The shapes judge: does an image match the spec of its prompt? Decided from pixels alone.

GenEval (Ghosh et al. 2023) checks generated images with an object detector; in the embedded
shapes world (system §4) objects are flat coloured shapes on a neutral background, so a cheap
exact detector suffices. At a fixed working scale:
1. pixels far in OKLab chroma from the background (the border's median) are foreground;
2. each takes the palette colour of nearest hue (hue survives anti-aliasing, JPEG and blending
   with a neutral background), smoothed by a chroma-weighted majority vote;
3. connected components per colour are objects (small same-blob fragments of a neighbouring
   hue merge in);
4. an object's shape is the template, rendered by the dataset's own renderer, with the highest
   soft IoU against its coverage map cropped to its box, whose proportions must be the
   template's; a circle must also be a disc by its outline and edge (`roundness`).
A spec passes when the detected objects equal its objects exactly and its relation holds.
Each attribute (count, colour, shape, position) is also judged on its own, so a learning curve
shows progress before whole prompts pass."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bdt.data.shapes import (COLORS, SHAPES, UNIT_EXTENT, check_spec, relation_holds,
                             shape_coverage)
from bdt.eval.roundness import is_disc

WORK_SHORT = 128       # analyse at 128 px on the short side: objects (>= 22% of it) get >= 28 px
CHROMA_MIN = 0.06      # OKLab chroma distance from the background that counts as object pixel
MIN_AREA_FRAC = 0.004  # components smaller than this x short_side^2 are specks
GRID = 32              # shapes are compared at 32 x 32 after cropping to their bounding box
VOTE_RADIUS = 3        # colour majority window (7 x 7 at the working scale)
FRAGMENT_FRAC = 0.3    # a piece below this x its blob's largest piece may be a colour fringe
GROW = 2               # coverage may extend this many working px past a component
MIN_IOU = 0.55         # below this soft IoU a component is no known shape
# Matching stretches a component's box to the template's square grid, so a 3:1 bar would read
# as a square: a box this far off the shape's own width/height ratio is no known shape.
ASPECT_TOL = 1.3


@dataclass
class Detection:
    shape: str        # one of SHAPES, or "unknown"
    color: str        # one of COLORS
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in input-image pixels
    center: tuple[float, float]
    iou: float        # IoU with the best shape template


ATTRIBUTES = ("count", "color", "shape", "position")


@dataclass
class Judgement:
    passed: bool
    reason: str = ""  # why it failed; empty when passed
    detected: list[Detection] = field(default_factory=list)
    # Each attribute judged alone; an attribute the spec does not constrain is absent.
    attributes: dict[str, bool] = field(default_factory=dict)


def _oklab(rgb_HW3: np.ndarray) -> np.ndarray:
    """sRGB uint8 -> OKLab (Ottosson 2020), a space where hue and chroma behave perceptually."""
    c = rgb_HW3.astype(np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                   [0.2119034982, 0.6806995451, 0.1073969566],
                   [0.0883024619, 0.2817188376, 0.6299787005]], np.float32)
    m2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                   [1.9779984951, -2.4285922050, 0.4505937099],
                   [0.0259040371, 0.7827717662, -0.8086757660]], np.float32)
    return np.cbrt(lin @ m1.T) @ m2.T


_COLOR_NAMES = list(COLORS)
_PALETTE_HUE = np.array([np.arctan2(lab[2], lab[1]) for lab in
                         _oklab(np.array([list(COLORS.values())], np.uint8))[0]])
# Nearest palette colour for 720 hue bins over [-pi, pi): a lookup, not a distance per pixel.
_BIN_HUE = -np.pi + (np.arange(720) + 0.5) * (2 * np.pi / 720)
_HUE_TO_COLOR = np.abs(np.angle(np.exp(1j * (_BIN_HUE[:, None] - _PALETTE_HUE)))).argmin(1)
# A colour and its neighbours around the hue circle (red-orange, ..., pink-red): the only
# colours that JPEG and blending leave at an object's edge.
_HUE_ORDER = [int(i) for i in np.argsort(_PALETTE_HUE)]
_FRINGE_PAIRS = {frozenset((a, b)) for a, b in zip(_HUE_ORDER, _HUE_ORDER[1:] + _HUE_ORDER[:1])
                 } | {frozenset((a,)) for a in _HUE_ORDER}
_ASPECT = {s: w / h for s, (w, h) in UNIT_EXTENT.items()}


def _normalise(alpha: np.ndarray) -> np.ndarray:
    """Crop a coverage map to the box of its half-covered pixels and resample to GRID x GRID.

    Soft coverage (not a 0/1 mask) keeps the sub-pixel evidence of thin parts: in a 64 px image
    a small star's arms are 3 px wide and a hard threshold after JPEG turns them into a disc.
    """
    ys, xs = np.nonzero(alpha >= 0.5)
    crop = alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop, "F").resize((GRID, GRID), Image.BILINEAR))


_TEMPLATES = {s: _normalise(shape_coverage(s, 128)) for s in SHAPES}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat pixel indices.

    Works on horizontal runs (a few per object row) with union-find, so the Python loop is over
    runs, not pixels; no scipy needed.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row-major order as the starts
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows_s, np.arange(h + 1))
    for y in range(1, h):
        i, i_end = row_first[y - 1], row_first[y]
        j, j_end = row_first[y], row_first[y + 1]
        while i < i_end and j < j_end:  # merge-walk two sorted run lists, union overlaps
            if starts[i] < ends[j] and starts[j] < ends[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    groups: dict[int, list[int]] = {}
    for r in range(len(starts)):
        groups.setdefault(find(r), []).append(r)
    out = []
    for runs in groups.values():
        out.append(np.concatenate([rows_s[r] * w + np.arange(starts[r], ends[r]) for r in runs]))
    return out


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        # int64 pixels (after arithmetic) were once clipped as floats to [0, 1]: a white image
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"integer image ({arr.dtype}) has values outside 0..255")
        arr = arr.astype(np.uint8)
    elif arr.dtype != np.uint8:  # float images are taken as [0, 1]
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


def _box_sum(x_HWC: np.ndarray, r: int) -> np.ndarray:
    """Sum over the (2r+1) x (2r+1) window around each pixel (zero outside); integral image."""
    h, w = x_HWC.shape[:2]
    ii = np.zeros((h + 1, w + 1) + x_HWC.shape[2:], np.float32)
    ii[1:, 1:] = x_HWC.cumsum(0).cumsum(1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    return (ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0])


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Every coloured object in `image`, sorted by position (top-left first)."""
    img = _to_rgb(image)
    if min(img.size) == 0:
        raise ValueError(f"an empty image ({img.width}x{img.height} px) holds nothing to judge")
    # One working scale for every input: small images are upsampled (smooth edges give better
    # masks for 12 px objects), large ones box-filtered down.
    scale = WORK_SHORT / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.BOX if scale < 1 else Image.BILINEAR)
    lab_HW3 = _oklab(np.asarray(img))
    h, w = lab_HW3.shape[:2]
    ab_HW2 = lab_HW3[..., 1:]
    border = np.concatenate([ab_HW2[0], ab_HW2[-1], ab_HW2[:, 0], ab_HW2[:, -1]])
    background_ab = np.median(border, axis=0)  # objects cover far less than half the border
    strength = np.linalg.norm(ab_HW2 - background_ab, axis=-1)
    foreground = strength >= CHROMA_MIN
    nearest = _HUE_TO_COLOR[((np.arctan2(ab_HW2[..., 1], ab_HW2[..., 0]) + np.pi)
                             * (len(_HUE_TO_COLOR) / (2 * np.pi))).astype(int) % len(_HUE_TO_COLOR)]
    # Each pixel takes the colour of the chroma-weighted majority around it: JPEG chroma
    # subsampling and blending leave thin fringes of a neighbouring hue (purple -> pink) that
    # would otherwise become objects of their own. Only colours present get a vote map.
    weight = np.where(foreground, strength, 0).astype(np.float32)
    present = [ci for ci in range(len(_COLOR_NAMES)) if (foreground & (nearest == ci)).any()]
    label = np.full((h, w), -1)
    if present:
        votes_HWK = np.stack([np.where(nearest == ci, weight, 0) for ci in present], -1)
        label = np.array(present)[_box_sum(votes_HWK, VOTE_RADIUS).argmax(-1)]
    rgb_HW3 = np.asarray(img, np.float32)
    min_area = MIN_AREA_FRAC * min(h, w) ** 2
    found = []
    for ci, flat in _pieces(foreground, label):
        if len(flat) < min_area:
            continue
        ys, xs = np.divmod(flat, w)
        alpha, (oy, ox) = _coverage(rgb_HW3, foreground, ys, xs, strength[ys, xs])
        if (alpha >= 0.5).sum() < min_area:
            continue
        norm = _normalise(alpha)
        ious = {s: np.minimum(norm, t).sum() / max(1e-6, np.maximum(norm, t).sum())
                for s, t in _TEMPLATES.items()}  # soft IoU
        best = max(ious, key=ious.get)
        cy, cx = np.nonzero(alpha >= 0.5)
        aspect = (cx.max() - cx.min() + 1) / (cy.max() - cy.min() + 1) / _ASPECT[best]
        known = ious[best] >= MIN_IOU and 1 / ASPECT_TOL <= aspect <= ASPECT_TOL
        if known and best == "circle":  # IoU alone passes hexagons and smears
            known = is_disc(alpha)
        box = [float(v) / scale for v in
               (ox + cx.min(), oy + cy.min(), ox + cx.max() + 1, oy + cy.max() + 1)]
        found.append(Detection(
            shape=best if known else "unknown", color=_COLOR_NAMES[ci],
            bbox=tuple(round(v, 2) for v in box),
            center=(round((box[0] + box[2]) / 2, 2), round((box[1] + box[3]) / 2, 2)),
            iou=round(float(ious[best]), 3)))
    return sorted(found, key=lambda d: (d.center[1], d.center[0]))


def _pieces(foreground: np.ndarray, label: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, flat pixel indices) of each single-colour object.

    Objects are the per-colour components of the foreground. A piece much smaller than the
    largest piece of the same foreground blob is a fragment of the largest object of its own or
    a neighbouring hue there (a JPEG-shifted star tip reads yellow on an orange star) and is
    merged into it; other pieces stay separate objects (touching shapes of different colours: a
    small blue square on a red circle is no fringe of it).
    """
    blob_of = np.full(foreground.size, -1)
    for bi, flat in enumerate(_components(foreground)):
        blob_of[flat] = bi
    by_blob: dict[int, list[tuple[int, np.ndarray]]] = {}
    for ci in np.unique(label[foreground]):
        for flat in _components(foreground & (label == ci)):
            by_blob.setdefault(int(blob_of[flat[0]]), []).append((int(ci), flat))
    out = []
    for pieces in by_blob.values():
        pieces.sort(key=lambda p: -len(p[1]))
        big = FRAGMENT_FRAC * len(pieces[0][1])
        objects = [[ci, [flat]] for ci, flat in pieces if len(flat) >= big]
        for ci, flat in pieces[len(objects):]:  # the largest object it may be a fringe of
            host = next((o for o in objects if frozenset((ci, o[0])) in _FRINGE_PAIRS), None)
            if host is None:
                objects.append([ci, [flat]])
            else:
                host[1].append(flat)
        out += [(ci, np.concatenate(flats)) for ci, flats in objects]
    return out


def _coverage(rgb_HW3: np.ndarray, foreground: np.ndarray, ys: np.ndarray, xs: np.ndarray,
              strength: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """How much of each pixel of a component the object covers, in [0, 1].

    The chroma threshold that found the component also keeps faint anti-aliased edge pixels,
    which fattens thin parts (star arms) until a small star looks like a circle. Coverage of a
    pixel blended between object colour o and local background g is the projection of
    (pixel - g) onto (o - g); its 0.5 level is the drawn outline.
    Returns the coverage in a window around the component (zero off it) and the window's
    (y, x) origin.
    """
    m = 2 * GROW  # window margin: local background around the component
    h, w = foreground.shape
    y0, y1 = max(0, ys.min() - m), min(h, ys.max() + m + 1)
    x0, x1 = max(0, xs.min() - m), min(w, xs.max() + m + 1)
    window = rgb_HW3[y0:y1, x0:x1]
    around = window[~foreground[y0:y1, x0:x1]]
    comp = np.zeros(window.shape[:2], bool)
    comp[ys - y0, xs - x0] = True
    if len(around) == 0:  # no background in sight: keep the component as found
        return comp.astype(np.float32), (y0, x0)
    g = np.median(around, axis=0)
    o = np.median(rgb_HW3[ys, xs][strength >= np.percentile(strength, 75)], axis=0)
    d = o - g
    alpha = (window - g) @ d / max(float(d @ d), 1e-6)
    # Faint tips (a triangle's apex) fall below the chroma threshold: let the coverage reach
    # GROW px past the component, still far less than the gap between rendered objects.
    support = _box_sum(comp[..., None].astype(np.float32), GROW)[..., 0] > 0
    return np.clip(alpha, 0, 1) * support, (y0, x0)


def _describe(objs: list[tuple[str, str | None]]) -> str:
    return ", ".join(f"{c or 'any-colour'} {s}" for s, c in objs) or "nothing"


def _same_objects(found: list[tuple[str, str]], wanted: list[tuple[str, str | None]]) -> bool:
    """Do detections (shape, colour) equal the wanted objects (shape, colour or None = any)?

    Exact without search: per shape the counts must be equal and each named colour must be
    there at least as often as it is asked for; the unnamed ones then take the rest.
    """
    if sorted(s for s, _ in found) != sorted(s for s, _ in wanted):
        return False
    return _covers(Counter(found), Counter(w for w in wanted if w[1] is not None))


def judge_attributes(found: list[Detection], spec: dict) -> dict[str, bool]:
    """Each attribute of `spec` judged alone on the detections:
    count     as many objects as asked;
    color     every named colour at least as often as asked (extra objects allowed);
    shape     every asked shape at least as often as asked (extra objects allowed);
    position  (specs with a relation) two distinct detections stand for the related groups, each
              matched on its colour when the group names one, else on its shape, and the
              relation holds between them.
    """
    wanted = [(g["shape"], g["color"]) for g in spec["groups"] for _ in range(g["count"])]
    out = {"count": len(found) == len(wanted),
           "shape": _covers(Counter(d.shape for d in found), Counter(s for s, _ in wanted))}
    named = Counter(c for _, c in wanted if c is not None)
    if named:
        out["color"] = _covers(Counter(d.color for d in found), named)
    relation = spec.get("relation")
    if relation is not None:
        ga, gb = (spec["groups"][relation[k]] for k in ("a", "b"))

        def stands_for(d: Detection, g: dict) -> bool:
            return d.color == g["color"] if g["color"] is not None else d.shape == g["shape"]

        out["position"] = any(
            stands_for(a, ga) and stands_for(b, gb)
            and relation_holds(relation["type"], a.center, b.center, 1.0)
            for a, b in itertools.permutations(found, 2))
    return out


def _covers(have: Counter, need: Counter) -> bool:
    return all(have[k] >= n for k, n in need.items())


def judge_image(image: Image.Image | np.ndarray, spec: dict) -> Judgement:
    """Does `image` show exactly the objects of `spec` (shapes and counts always, colours where
    the spec names them) in its relation (on the dominant axis)? Arrays are HxWx3 integers in
    0..255, or float in [0, 1]. The verdict carries each attribute judged alone (`judge_attributes`)."""
    check_spec(spec)
    found = detect(image)
    verdict = _judge_objects(found, spec)
    verdict.attributes = judge_attributes(found, spec)
    return verdict


def _judge_objects(found: list[Detection], spec: dict) -> Judgement:
    got = [(d.shape, d.color) for d in found]
    wanted = [(g["shape"], g["color"]) for g in spec["groups"] for _ in range(g["count"])]
    if len(got) != len(wanted):
        return Judgement(False, f"expected {len(wanted)} objects ({_describe(wanted)}), "
                                f"found {len(got)} ({_describe(got)})", found)
    if not _same_objects(got, wanted):
        return Judgement(False, f"expected {_describe(wanted)}, found {_describe(got)}", found)
    relation = spec.get("relation")
    if relation is None:
        return Judgement(True, "", found)
    # Relations join two single-object groups: try each pair of detections that can stand for
    # them, with the other detections still matching the other groups.
    ga, gb = (spec["groups"][relation[k]] for k in ("a", "b"))
    rest = [(g["shape"], g["color"]) for gi, g in enumerate(spec["groups"])
            if gi not in (relation["a"], relation["b"]) for _ in range(g["count"])]
    fits = [lambda d, g=g: d.shape == g["shape"] and g["color"] in (None, d.color)
            for g in (ga, gb)]
    for i, j in itertools.permutations(range(len(found)), 2):
        if (fits[0](found[i]) and fits[1](found[j])
                and relation_holds(relation["type"], found[i].center, found[j].center, 1.0)
                and _same_objects([o for k, o in enumerate(got) if k not in (i, j)], rest)):
            return Judgement(True, "", found)
    return Judgement(False, f"objects match but relation '{relation['type']}' does not hold",
                     found)


def score(judgements: list[Judgement], categories: list[str]) -> dict:
    """GenEval-style scores: accuracy per category and overall = mean over the categories; and
    per attribute, the accuracy over the judgements that constrain it (`attribute_counts`)."""
    if len(judgements) != len(categories):
        raise ValueError(f"{len(judgements)} judgements but {len(categories)} categories")
    if not judgements:
        raise ValueError("no judgements to score (a score of 0 would read as a result)")
    per: dict[str, list[bool]] = {}
    for j, c in zip(judgements, categories):
        per.setdefault(c, []).append(j.passed)
    accuracy = {c: float(np.mean(v)) for c, v in sorted(per.items())}
    by_attribute = {a: [j.attributes[a] for j in judgements if a in j.attributes]
                    for a in ATTRIBUTES}
    return {"overall": float(np.mean(list(accuracy.values()))) if accuracy else 0.0,
            "per_category": accuracy, "counts": {c: len(v) for c, v in sorted(per.items())},
            "per_attribute": {a: float(np.mean(v)) for a, v in by_attribute.items() if v},
            "attribute_counts": {a: len(v) for a, v in by_attribute.items() if v}}
