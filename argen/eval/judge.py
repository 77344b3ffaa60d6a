"""Rule-based shapes judge: read an image back into a Scene and score a caption against it (GenEval style)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from argen.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    CaptionSpec,
    Scene,
    ShapeObject,
    parse_caption,
    relation_holds,
    shape_coverage,
)

MIN_SIDE, MAX_SIDE = 32, 128
FG_CONTRAST = 70.0  # |pixel - background| in RGB units above which a pixel is foreground (objects are ~230)
MIN_AREA_CELLS = 0.04  # soft area below this fraction of a cell is noise; the smallest object (small triangle) is 0.125
SPLIT_SHARE = 0.2  # a second colour inside one blob counts as a second object when it holds this share of the blob
_COLOR_NAMES = tuple(COLORS)
_COLOR_DIRS = np.array([np.asarray(c, np.float64) / np.linalg.norm(c) for c in COLORS.values()])  # (8, 3)
ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


@dataclass
class JudgeResult:
    """Whole-prompt and per-attribute correctness. `attributes[a]` is None when the caption does not mention
    `a` (count is always checked). `found` is the parsed scene; `reason` says what is wrong ("" if correct)."""

    correct: bool
    attributes: dict[str, bool | None]
    found: Scene
    reason: str = ""
    spec: CaptionSpec | None = field(default=None, repr=False)


def to_uint8_image(image) -> np.ndarray:
    """Accept np uint8 (H, W, 3), a PIL image, or a torch float tensor (3, H, W) in [-1, 1]; return (H, W, 3)
    uint8. Raises ValueError for other types, dtypes, layouts or sizes outside [MIN_SIDE, MAX_SIDE] (square)."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy image must be uint8 (H, W, 3), got dtype={image.dtype} shape={image.shape}")
        array = image
    elif type(image).__module__.startswith("torch"):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"torch image must be float (3, H, W) in [-1, 1], got dtype={image.dtype} "
                             f"shape={tuple(image.shape)}")
        t = image.detach().float().cpu().clamp(-1, 1)
        array = ((t.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    else:
        raise ValueError(f"image must be a numpy uint8 (H, W, 3) array, a PIL.Image or a torch (3, H, W) float "
                         f"tensor, got {type(image).__name__}")
    h, w = array.shape[:2]
    if h != w or not MIN_SIDE <= h <= MAX_SIDE:
        raise ValueError(f"image must be square with side in [{MIN_SIDE}, {MAX_SIDE}] px, got {h}x{w}")
    return array


@dataclass(frozen=True)
class Blob:
    """One segmented object: its colour, soft coverage map (H, W) in [0, 1], soft area and the centre of its
    bounding-box profile, in pixels."""

    color: str
    coverage: np.ndarray = field(repr=False, compare=False)
    area: float
    x_mid: float
    y_mid: float


def measure(image) -> list[Blob]:
    """Segment an image by colour and measure each object (see `parse`); noise blobs are dropped."""
    rgb = to_uint8_image(image).astype(np.float64)
    res = rgb.shape[0]
    cell = res / 3
    background = np.median(rgb.reshape(-1, 3), axis=0)  # objects cover at most ~25% of the image
    diff = rgb - background  # (H, W, 3)
    contrast = np.linalg.norm(diff, axis=-1)  # (H, W)
    fg = contrast > FG_CONTRAST
    labels = np.argmax(diff @ _COLOR_DIRS.T, axis=-1)  # (H, W) nearest colour direction (cosine ~ dot / |diff|)
    blobs, n_blobs = ndimage.label(fg, structure=np.ones((3, 3)))
    regions: list[np.ndarray] = []
    for b in range(1, n_blobs + 1):
        blob = blobs == b
        weights = np.bincount(labels[blob], weights=contrast[blob], minlength=len(_COLOR_NAMES))
        major = np.flatnonzero(weights >= SPLIT_SHARE * weights.sum())
        if len(major) <= 1:
            regions.append(blob)
            continue
        # Two colours touching: give each pixel to the nearest of the major colours, then split.
        nearest = major[np.argmax(diff[blob] @ _COLOR_DIRS[major].T, axis=-1)]
        for m in major:
            sub = np.zeros_like(blob)
            sub[blob] = nearest == m
            regions.append(sub)
    taken = np.zeros_like(fg)
    for r in regions:
        taken |= r
    out: list[Blob] = []
    idx = np.arange(res) + 0.5  # pixel centres
    for region in regions:
        mean = diff[region].sum(axis=0)
        direction = mean / (np.linalg.norm(mean) + 1e-9)
        color = _COLOR_NAMES[int(np.argmax(_COLOR_DIRS @ direction))]
        support = ndimage.binary_dilation(region, np.ones((3, 3), bool)) & ~(taken & ~region)  # region + 1 px ring
        proj = diff @ direction  # (H, W)
        amplitude = np.percentile(proj[region], 90)
        cov = np.where(support, np.clip(proj / max(amplitude, 1e-6), 0.0, 1.0), 0.0)  # (H, W) soft coverage
        area = float(cov.sum())
        if area < MIN_AREA_CELLS * cell * cell:
            continue
        px, py = cov.max(axis=0), cov.max(axis=1)  # (W,), (H,) profiles of the bounding box
        x_mid, y_mid = float((idx * px).sum() / px.sum()), float((idx * py).sum() / py.sum())
        out.append(Blob(color=color, coverage=cov, area=area, x_mid=x_mid, y_mid=y_mid))
    return out


@lru_cache(maxsize=4096)
def _template(shape: str, size: str, cx: float, cy: float, resolution: int) -> np.ndarray:
    """The renderer's own coverage of one shape and size with its box centred at (cx, cy)."""
    extent = SIZE_FRACTION[size] * resolution / 3
    return shape_coverage(shape, cx=cx, cy=cy, extent=extent, resolution=resolution,
                          supersample=max(4, 256 // resolution))


def classify(blob: Blob, *, resolution: int) -> ShapeObject:
    """Shape and size by template matching, position from the grid cell of the box centre.

    The blob's soft coverage is compared (sum of squared differences) with the renderer's coverage of each
    shape and size, centred where the blob's box is centred (to a quarter pixel), so the decision uses the
    whole silhouette rather than one summary statistic: at 32 px a small circle and a small square differ in
    only a few corner pixels, which a fill-ratio threshold cannot separate once the edges are blurred."""
    cx, cy = round(blob.x_mid * 4) / 4, round(blob.y_mid * 4) / 4
    errors = {(shape, size): float(np.square(blob.coverage - _template(shape, size, cx, cy, resolution)).sum())
              for shape in SHAPES for size in SIZES}
    shape, size = min(errors, key=errors.get)
    cell = resolution / 3
    row, col = min(2, int(blob.y_mid // cell)), min(2, int(blob.x_mid // cell))
    return ShapeObject(shape=shape, color=blob.color, size=size, position=POSITIONS[3 * row + col])


def parse(image) -> Scene:
    """Read objects back from an image (see `to_uint8_image` for accepted inputs): colour segmentation, then
    per object a template match of its soft coverage (shape and size) and the grid cell of its box centre
    (position). Sorted by cell, largest first within a cell; any number may be found."""
    res = to_uint8_image(image).shape[0]
    blobs = sorted(measure(image), key=lambda b: -b.area)
    objects = [classify(b, resolution=res) for b in blobs]
    return Scene(tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


def _checks(spec: CaptionSpec, objs: list[ShapeObject | None]) -> dict[str, list[bool]]:
    """Per-attribute outcomes of matching spec.objects[i] to objs[i] (None: no object for that spec)."""
    out: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES if a != "count"}
    for want, got in zip(spec.objects, objs):
        for attr in ("shape", "color", "size", "position"):
            value = getattr(want, attr)
            if value is not None:
                out[attr].append(got is not None and getattr(got, attr) == value)
    if spec.relation is not None:
        a, b = objs[spec.relation.subject], objs[spec.relation.object]
        out["relation"].append(a is not None and b is not None
                               and relation_holds(spec.relation.kind, a.position, b.position))
    return out


def match(spec: CaptionSpec, scene: Scene) -> tuple[dict[str, bool | None], list[ShapeObject | None]]:
    """Best assignment of scene objects to the caption's objects (most attribute checks passed) and the
    per-attribute outcome under it. Also used to check that a corrupted scene really contradicts a caption."""
    found = list(scene.objects)[:12]  # beyond 12 objects the count is wrong anyway; keep the search small
    n = len(spec.objects)
    candidates = list(range(len(found))) + [None] * n
    best_score, best_objs, best_checks = -1, [], {}
    for perm in dict.fromkeys(itertools.permutations(candidates, n)):  # dedupe, keeping a fixed order
        objs = [None if k is None else found[k] for k in perm]
        checks = _checks(spec, objs)
        score = sum(sum(v) for v in checks.values())
        if score > best_score:
            best_score, best_objs, best_checks = score, objs, checks
    attributes: dict[str, bool | None] = {"count": len(scene.objects) == n}
    for attr, outcomes in best_checks.items():
        attributes[attr] = all(outcomes) if outcomes else None
    return attributes, best_objs


def judge(caption: str, image) -> JudgeResult:
    """Score `image` against `caption`: correct iff the image holds exactly the caption's objects with every
    stated attribute and relation. Raises ValueError for a caption outside the grammar or a bad image."""
    spec = parse_caption(caption)
    found = parse(image)
    attributes, objs = match(spec, found)
    correct = all(v is not False for v in attributes.values())
    reasons = []
    if not attributes["count"]:
        reasons.append(f"expected {len(spec.objects)} object(s), found {len(found.objects)}")
    for want, got in zip(spec.objects, objs):
        if got is None:
            reasons.append(f"no {want.describe()}")
        elif not want.matches(got):
            reasons.append(f"wanted {want.describe()}, closest is {got.describe()}")
    if attributes["relation"] is False:
        reasons.append(f"relation '{spec.relation.kind}' does not hold")
    reason = "" if correct else "; ".join(reasons) + f" (found: {found.describe()})"
    return JudgeResult(correct=correct, attributes=attributes, found=found, reason=reason, spec=spec)


def binding_error(result: JudgeResult) -> bool | None:
    """Whether the image shows the caption's objects with their attributes swapped between them: the right number of
    objects, every stated colour, shape and size present (each attribute matches under some assignment of objects to
    the caption's), but no one assignment matches them all ("a red circle and a blue square" drawn as a blue circle
    and a red square). None for captions of fewer than two objects, where nothing can be bound to the wrong object."""
    spec, found = result.spec, list(result.found.objects)
    if spec is None or len(spec.objects) < 2:
        return None
    if len(found) != len(spec.objects) or result.correct:
        return False
    perms = list(itertools.permutations(found))

    def fits(perm, attrs) -> bool:
        return all(getattr(want, a) is None or getattr(want, a) == getattr(got, a)
                   for want, got in zip(spec.objects, perm) for a in attrs)

    each = all(any(fits(perm, (a,)) for perm in perms) for a in ("color", "shape", "size"))
    return each and not any(fits(perm, ("color", "shape", "size")) for perm in perms)


def degrade(image_uint8: np.ndarray, *, generator: np.random.Generator) -> np.ndarray:
    """The fixed degradation that mimics a VQ tokenizer's reconstruction error, (H, W, 3) uint8 -> same:
    Gaussian blur with sigma = H / 64 px (0.5 px at 32), a per-image colour shift (per-channel gain in
    [0.92, 1.08] and offset in [-12, 12]) and per-pixel Gaussian noise with std 8 (of 255)."""
    if not isinstance(image_uint8, np.ndarray) or image_uint8.dtype != np.uint8 or image_uint8.ndim != 3 \
            or image_uint8.shape[2] != 3:
        raise ValueError(f"degrade expects a uint8 (H, W, 3) array, got {getattr(image_uint8, 'dtype', type(image_uint8))} "
                         f"{getattr(image_uint8, 'shape', '')}")
    x = image_uint8.astype(np.float64)
    sigma = image_uint8.shape[0] / 64
    x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    gain = generator.uniform(0.92, 1.08, size=3)
    offset = generator.uniform(-12, 12, size=3)
    x = x * gain + offset + generator.normal(0.0, 8.0, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


CORRUPTIONS = ("color", "shape", "size", "position", "missing", "extra")


def corrupt_scene(scene: Scene, spec: CaptionSpec, *, kind: str, generator: np.random.Generator) -> Scene | None:
    """A scene that contradicts `spec` by one change of `kind`: recolour / reshape / resize / move one object
    whose changed attribute the caption states (for a relation, swap the two objects' cells), drop one object,
    or add one in a free cell. Returns None when the caption states nothing that `kind` can break.
    Every returned scene is checked symbolically (`match`) to contradict the caption."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind={kind!r} is not one of {CORRUPTIONS}")
    objs = list(scene.objects)
    used = {o.position for o in objs}
    free = [p for p in POSITIONS if p not in used]
    candidates: list[Scene] = []
    if kind == "missing":
        candidates = [Scene(tuple(objs[:i] + objs[i + 1:])) for i in range(len(objs))]
    elif kind == "extra":
        for _ in range(8):
            extra = ShapeObject(shape=SHAPES[generator.integers(3)], color=_COLOR_NAMES[generator.integers(8)],
                                size=SIZES[generator.integers(2)], position=free[generator.integers(len(free))])
            candidates.append(Scene(tuple(objs + [extra])))
    else:
        values = {"color": _COLOR_NAMES, "shape": SHAPES, "size": SIZES, "position": tuple(free)}[kind]
        mentioned = any(getattr(o, kind) is not None for o in spec.objects)
        for i in generator.permutation(len(objs)):
            for v in generator.permutation(len(values)):
                if mentioned and values[v] != getattr(objs[i], kind):
                    new = objs.copy()
                    new[i] = ShapeObject(**{**objs[i].__dict__, kind: values[v]})
                    candidates.append(Scene(tuple(new)))
        if kind == "position" and spec.relation is not None and len(objs) == 2:
            candidates.append(Scene((ShapeObject(**{**objs[0].__dict__, "position": objs[1].position}),
                                     ShapeObject(**{**objs[1].__dict__, "position": objs[0].position}))))
    for candidate in candidates:
        attributes, _ = match(spec, candidate)
        if not all(v is not False for v in attributes.values()):
            return candidate
    return None
