"""The built-in shapes world: vocabulary, seeded scenes, renderer, caption grammar and parser, splits, Dataset."""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "magenta": (225, 40, 220),
    "cyan": (30, 215, 225),
    "white": (240, 240, 240),
    "orange": (250, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # 3x3 cells, row-major: POSITIONS.index(p) == 3 * row + col
RESOLUTIONS = (32, 64, 128)
SPLITS = ("train", "val", "heldout")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (0, 0, 0)

# Object extent (bounding-box side) as a fraction of the grid cell side. Chosen so that at 32 px a small
# object is ~5.3 px and a large one ~8.7 px (area ratio 2.7), and two large objects in adjacent cells keep
# a gap of ~1.9 px, which survives the mild blur of `argen.eval.judge.degrade`.
SIZE_FRACTION = {"small": 0.5, "large": 0.82}

# Combinations that never appear anywhere in a train or val scene, and that every heldout scene contains
# and its caption states. A relation triple (a, rel, b) is present when an object of colour a stands in
# `rel` to an object of colour b (see `relation_holds`).
HELDOUT_COLOR_SHAPE = (("orange", "triangle"), ("cyan", "circle"), ("white", "square"))
HELDOUT_RELATIONS = (("green", "above", "magenta"), ("blue", "left of", "yellow"))

VAL_FRACTION_DENOM = 20  # 1 in 20 scene identities belongs to val and is never used by train
SPLIT_SIZES = {"train": 1_000_000, "val": 2000, "heldout": 1000}

_NUMBERS = {"two": 2, "three": 3}
_NUMBER_WORDS = {2: "two", 3: "three"}
_ARTICLES = ("a", "an", "one")
_PREPOSITIONS = ("in", "at", "on")
_POSITION_SYNONYMS = {"middle": "center", "centre": "center"}
_RELATION_PHRASES = {
    ("to", "the", "left", "of"): "left of",
    ("to", "the", "right", "of"): "right of",
    ("left", "of"): "left of",
    ("right", "of"): "right of",
    ("above",): "above",
    ("below",): "below",
}
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of a colour and size in one cell of the 3x3 grid."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"ShapeObject.{field}={value!r} is not one of {allowed}")

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape} at {self.position}"


@dataclass(frozen=True)
class Scene:
    """Objects on a plain background. Generated scenes hold 1 to 3 objects in distinct cells; a scene parsed
    from an image by the judge may hold any number (0 for a blank image, two in one cell, ...)."""

    objects: tuple[ShapeObject, ...]

    def describe(self) -> str:
        return "; ".join(o.describe() for o in self.objects) if self.objects else "no objects"


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption claims about one object; None where the caption does not say."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None

    def matches(self, obj: ShapeObject) -> bool:
        return all(want is None or want == got for want, got in (
            (self.shape, obj.shape), (self.color, obj.color), (self.size, obj.size), (self.position, obj.position)))

    def describe(self) -> str:
        words = [w for w in (self.size, self.color, self.shape) if w is not None]
        return " ".join(words) + (f" at {self.position}" if self.position else "")


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` is `kind` (left of / right of / above / below) `objects[object]`."""

    kind: str
    subject: int
    object: int


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption claims: exactly these objects (a count expands to that many equal specs), and a relation."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None


# ----------------------------------------------------------------------------------------------- grid geometry

def cell_of(position: str) -> tuple[int, int]:
    """(row, col) of a position, both in {0, 1, 2}; row 0 is the top, col 0 the left."""
    return divmod(POSITIONS.index(position), 3)


def relation_holds(kind: str, subject: str, obj: str) -> bool:
    """Relations on grid cells, comparing one axis only and strictly:
    `left of`  <=> col(subject) < col(object);   `right of` <=> col(subject) > col(object);
    `above`    <=> row(subject) < row(object);   `below`    <=> row(subject) > row(object).
    The other axis is ignored, so a top-left object is both `left of` and `above` a bottom-right one."""
    (r1, c1), (r2, c2) = cell_of(subject), cell_of(obj)
    if kind == "left of":
        return c1 < c2
    if kind == "right of":
        return c1 > c2
    if kind == "above":
        return r1 < r2
    if kind == "below":
        return r1 > r2
    raise ValueError(f"unknown relation {kind!r}; expected one of {RELATIONS}")


# ----------------------------------------------------------------------------------------------- rendering

def object_geometry(obj: ShapeObject, resolution: int) -> tuple[float, float, float]:
    """(cx, cy, extent) in pixels: the centre of the object's bounding box (= its cell centre) and its side."""
    cell = resolution / 3
    row, col = cell_of(obj.position)
    return (col + 0.5) * cell, (row + 0.5) * cell, SIZE_FRACTION[obj.size] * cell


def shape_coverage(shape: str, *, cx: float, cy: float, extent: float, resolution: int,
                   supersample: int = 8) -> np.ndarray:
    """Antialiased coverage (resolution, resolution) float32 in [0, 1] of one shape whose bounding box is a
    square of side `extent` centred at (cx, cy) (pixel i spans [i, i+1)). The triangle points up: apex at
    the top centre, base along the bottom edge."""
    out = np.zeros((resolution, resolution), np.float32)
    half = extent / 2
    x0, x1 = max(0, math.floor(cx - half)), min(resolution, math.ceil(cx + half))
    y0, y1 = max(0, math.floor(cy - half)), min(resolution, math.ceil(cy + half))
    if x1 <= x0 or y1 <= y0:
        return out
    s = supersample
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s  # sub-sample centres
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    patch = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = patch
    return out


def render(scene: Scene, resolution: int) -> np.ndarray:
    """Render a scene: (resolution, resolution, 3) uint8 RGB, objects on a black background."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution={resolution} is not supported; expected one of {RESOLUTIONS}")
    image = np.empty((resolution, resolution, 3), np.float32)
    image[:] = BACKGROUND
    for obj in scene.objects:
        cov = _object_coverage(obj.shape, obj.size, obj.position, resolution)
        image = image * (1 - cov) + np.asarray(COLORS[obj.color], np.float32) * cov
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _object_coverage(shape: str, size: str, position: str, resolution: int) -> np.ndarray:
    """Read-only (resolution, resolution, 1) coverage of one object; colour-free, so 54 per resolution, each
    computed once (rendering is on the data path of every training step)."""
    cx, cy, extent = object_geometry(ShapeObject(shape=shape, color="red", size=size, position=position), resolution)
    cov = shape_coverage(shape, cx=cx, cy=cy, extent=extent, resolution=resolution,
                         supersample=max(4, 256 // resolution))[..., None]
    cov.flags.writeable = False
    return cov


# ----------------------------------------------------------------------------------------------- captions

def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, *, size: bool, color: bool, position: bool) -> str:
    words = ([obj.size] if size else []) + ([obj.color] if color else []) + [obj.shape]
    text = f"{_article(words[0])} {' '.join(words)}"
    return text + (" " + _position_phrase(obj.position) if position else "")


def _position_phrase(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def _relation_phrase(kind: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(kind, kind)


def _vocabulary() -> set[str]:
    words = set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(SIZES) | set(_NUMBERS)
    words |= {w for p in POSITIONS for w in p.split()} | set(_POSITION_SYNONYMS) | set(_ARTICLES)
    words |= set(_PREPOSITIONS) | {"the", "and", "corner"} | {w for p in _RELATION_PHRASES for w in p}
    return words


def parse_caption(caption: str) -> CaptionSpec:
    """Parse a caption of the shapes grammar into what it claims.

    Grammar (case and a final period are ignored; commas separate list items):
        caption := np REL np | np ("," np)* ["and" np]
        np      := ("a" | "an" | "one" | "two" | "three") [size] [colour] shape[s] [("in"|"at"|"on") "the" position ["corner"]]
        REL     := "to the left of" | "left of" | "to the right of" | "right of" | "above" | "below"
    Both sides of a relation are single objects. Raises ValueError for an empty caption, unknown words
    (naming them and listing the vocabulary) or words in an order the grammar does not allow.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.strip().lower().rstrip(".").strip()
    if not text:
        raise ValueError(f"empty caption {caption!r}: describe the scene, e.g. 'a large red circle in the top left'")
    tokens = re.findall(r"[a-z]+|,|\S", text)
    vocab = _vocabulary()
    unknown = sorted({t for t in tokens if t != "," and t not in vocab})
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in caption {caption!r}; the vocabulary is {sorted(vocab)}")
    return _Parser(tokens, caption).parse()


class _Parser:
    """Recursive-descent parser over the token list of one caption."""

    def __init__(self, tokens: list[str], caption: str) -> None:
        self.tokens, self.caption, self.i = tokens, caption, 0

    def fail(self, expected: str) -> ValueError:
        got = repr(self.tokens[self.i]) if self.i < len(self.tokens) else "the end of the caption"
        return ValueError(f"cannot parse caption {self.caption!r}: expected {expected} at word {self.i + 1}, got {got}")

    def peek(self, k: int = 0) -> str | None:
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else None

    def parse(self) -> CaptionSpec:
        first = self.noun_phrase()
        relation = self.relation()
        if relation is not None:
            second = self.noun_phrase()
            if len(first) != 1 or len(second) != 1:
                raise ValueError(f"cannot parse caption {self.caption!r}: both sides of '{relation}' must be one object")
            self.end()
            return CaptionSpec(objects=(first[0], second[0]), relation=Relation(relation, 0, 1))
        objects = list(first)
        while self.peek() in (",", "and"):
            self.i += 1
            if self.peek() == "and":
                self.i += 1
            objects.extend(self.noun_phrase())
        self.end()
        if len(objects) > 3:
            raise ValueError(f"caption {self.caption!r} describes {len(objects)} objects; at most 3 are supported")
        positions = [o.position for o in objects if o.position is not None]
        if len(set(positions)) != len(positions):
            raise ValueError(f"caption {self.caption!r} puts two objects at the same position; objects occupy distinct cells")
        return CaptionSpec(objects=tuple(objects))

    def end(self) -> None:
        if self.i != len(self.tokens):
            raise self.fail("'and', ',' or the end of the caption")

    def relation(self) -> str | None:
        for phrase, kind in _RELATION_PHRASES.items():
            if tuple(self.tokens[self.i:self.i + len(phrase)]) == phrase:
                self.i += len(phrase)
                return kind
        return None

    def noun_phrase(self) -> list[ObjectSpec]:
        det = self.peek()
        if det in _ARTICLES:
            count = 1
        elif det in _NUMBERS:
            count = _NUMBERS[det]
        else:
            raise self.fail("an article or number ('a', 'an', 'one', 'two', 'three')")
        self.i += 1
        size = self.take(SIZES)
        color = self.take(tuple(COLORS))
        word = self.peek()
        plural = {s + "s": s for s in SHAPES}
        if count == 1 and word in SHAPES:
            shape = word
        elif count > 1 and word in plural:
            shape = plural[word]
        else:
            form = "a plural shape ('circles', 'squares', 'triangles')" if count > 1 else f"a shape {SHAPES}"
            raise self.fail(form)
        self.i += 1
        position = None
        if self.peek() in _PREPOSITIONS and self.peek(1) == "the":
            self.i += 2
            position = self.position()
            if count > 1:
                raise ValueError(f"caption {self.caption!r}: {count} objects cannot share one position")
        return [ObjectSpec(shape=shape, color=color, size=size, position=position)] * count

    def take(self, options: tuple[str, ...]) -> str | None:
        if self.peek() in options:
            self.i += 1
            return self.tokens[self.i - 1]
        return None

    def position(self) -> str:
        word = _POSITION_SYNONYMS.get(self.peek() or "", self.peek())
        if word in ("top", "bottom") and self.peek(1) in ("left", "right"):
            position = f"{word} {self.peek(1)}"
            self.i += 2
        elif word in POSITIONS:
            position = word
            self.i += 1
        else:
            raise self.fail(f"a position {POSITIONS}")
        if self.peek() == "corner":
            if " " not in position:
                raise self.fail("'and', ',' or the end of the caption ('corner' only follows a corner position)")
            self.i += 1
        return position


# ----------------------------------------------------------------------------------------------- scene sampling

def heldout_pair(objects) -> tuple[str, str] | None:
    """The held-out (colour, shape) pair among `objects` (scene objects or a caption's object specs), or None."""
    present = {(o.color, o.shape) for o in objects}
    return next((p for p in HELDOUT_COLOR_SHAPE if p in present), None)


def scene_has_heldout(scene: Scene) -> bool:
    """True if the scene contains a held-out colour-shape pair or a held-out coloured relation anywhere."""
    if heldout_pair(scene.objects) is not None:
        return True
    for a in scene.objects:
        for b in scene.objects:
            if a is not b and any(a.color == ca and b.color == cb and relation_holds(rel, a.position, b.position)
                                  for ca, rel, cb in HELDOUT_RELATIONS):
                return True
    return False


def scene_key(scene: Scene) -> str:
    """Identity of a scene, independent of object order (captions are not part of it)."""
    return "|".join(sorted(f"{o.size},{o.color},{o.shape},{o.position}" for o in scene.objects))


def in_val_partition(scene: Scene) -> bool:
    """Whether a scene identity belongs to val (a fixed 1/VAL_FRACTION_DENOM of identities by hash)."""
    digest = hashlib.blake2b(scene_key(scene).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VAL_FRACTION_DENOM == 0


TEMPLATES = ("single_full", "single_partial", "list", "count", "relation")  # the caption templates of train and val
_TEMPLATE_P = (0.25, 0.2, 0.2, 0.15, 0.2)
_PARTIAL_FIELDS = (("color",), ("size", "color"), ("size", "position"), ("color", "position"))


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, position: str, *, color: str | None = None,
                   shape: str | None = None, size: str | None = None) -> ShapeObject:
    return ShapeObject(shape=shape or _choice(rng, SHAPES), color=color or _choice(rng, tuple(COLORS)),
                       size=size or _choice(rng, SIZES), position=position)


def _relation_cells(rng: np.random.Generator, kind: str) -> tuple[str, str]:
    """A uniformly random ordered pair of cells (subject, object) for which `kind` holds."""
    return _choice(rng, _relation_pairs(kind))


@functools.lru_cache(maxsize=None)
def _relation_pairs(kind: str) -> tuple[tuple[str, str], ...]:
    return tuple((a, b) for a in POSITIONS for b in POSITIONS if relation_holds(kind, a, b))


def _sample(rng: np.random.Generator, *, template: str, color: str | None = None,
            shape: str | None = None) -> tuple[Scene, str]:
    """One scene and its caption from `template`; the first described object takes `color`/`shape` if given."""
    cells = [POSITIONS[i] for i in rng.permutation(9)]
    if template == "single_full":
        obj = _random_object(rng, cells[0], color=color, shape=shape)
        return Scene((obj,)), _noun_phrase(obj, size=True, color=True, position=True)
    if template == "single_partial":
        options = _PARTIAL_FIELDS if color is None and shape is None else (("color",), ("size", "color"), ("color", "position"))
        fields = _choice(rng, options)
        obj = _random_object(rng, cells[0], color=color, shape=shape)
        return Scene((obj,)), _noun_phrase(obj, size="size" in fields, color="color" in fields,
                                           position="position" in fields)
    if template == "list":
        n = int(rng.integers(2, 4))
        with_size, with_position = bool(rng.integers(2)), bool(rng.integers(4) > 0)
        objs: list[ShapeObject] = []
        while len(objs) < n:  # distinct (colour, shape) so that the list reads unambiguously
            first = not objs
            obj = _random_object(rng, cells[len(objs)], color=color if first else None, shape=shape if first else None)
            if all((obj.color, obj.shape) != (o.color, o.shape) for o in objs):
                objs.append(obj)
        phrases = [_noun_phrase(o, size=with_size, color=True, position=with_position) for o in objs]
        caption = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return Scene(tuple(objs)), caption
    if template == "count":
        n = int(rng.integers(2, 4))
        col, shp = color or _choice(rng, tuple(COLORS)), shape or _choice(rng, SHAPES)
        size = _choice(rng, SIZES) if rng.integers(2) else None
        objs = [_random_object(rng, cells[k], color=col, shape=shp, size=size) for k in range(n)]
        caption = f"{_NUMBER_WORDS[n]} {size + ' ' if size else ''}{col} {shp}s"
        return Scene(tuple(objs)), caption
    if template == "relation":
        kind = _choice(rng, RELATIONS)
        pos_a, pos_b = _relation_cells(rng, kind)
        a = _random_object(rng, pos_a, color=color, shape=shape)
        while True:
            b = _random_object(rng, pos_b)
            if (b.color, b.shape) != (a.color, a.shape):
                break
        with_size = bool(rng.integers(2))
        caption = (f"{_noun_phrase(a, size=with_size, color=True, position=False)} {_relation_phrase(kind)} "
                   f"{_noun_phrase(b, size=with_size, color=True, position=False)}")
        return Scene((a, b)), caption
    raise AssertionError(template)


def _sample_heldout(rng: np.random.Generator) -> tuple[Scene, str]:
    combos = [("pair", c) for c in HELDOUT_COLOR_SHAPE] + [("relation", r) for r in HELDOUT_RELATIONS]
    kind, combo = _choice(rng, combos)
    if kind == "pair":
        template = TEMPLATES[int(rng.choice(len(TEMPLATES), p=_TEMPLATE_P))]
        return _sample(rng, template=template, color=combo[0], shape=combo[1])
    color_a, rel, color_b = combo
    if rng.integers(2):  # state it from the other side: "a magenta square below a green circle"
        color_a, rel, color_b = color_b, _CONVERSE[rel], color_a
    pos_a, pos_b = _relation_cells(rng, rel)
    a = _random_object(rng, pos_a, color=color_a)
    b = _random_object(rng, pos_b, color=color_b)
    with_size = bool(rng.integers(2))
    caption = (f"{_noun_phrase(a, size=with_size, color=True, position=False)} {_relation_phrase(rel)} "
               f"{_noun_phrase(b, size=with_size, color=True, position=False)}")
    return Scene((a, b)), caption


def check_templates(templates: tuple[str, ...] | None, split: str = "train") -> tuple[str, ...] | None:
    """`templates` as a tuple in TEMPLATES order, or None (all); unknown or repeated names, or templates on the
    heldout split, raise ValueError."""
    if templates is None:
        return None
    templates = tuple(templates)
    unknown = [t for t in templates if t not in TEMPLATES]
    if unknown or not templates or len(set(templates)) != len(templates):
        raise ValueError(f"templates must be distinct names from {', '.join(TEMPLATES)}; got {list(templates)}.")
    if split == "heldout":
        raise ValueError("templates apply to the train and val splits; heldout scenes are built around a held-out combination.")
    return tuple(t for t in TEMPLATES if t in templates)


def parse_templates(names: str | None) -> tuple[str, ...] | None:
    """Comma-separated template names ("relation", "list,relation"; as in the `shapes:TEMPLATES` dataset spec) as
    checked by `check_templates`; None or "" means all."""
    return check_templates(tuple(names.split(","))) if names else None


@functools.lru_cache(maxsize=None)
def _template_weights(templates: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The templates a stream draws and their probabilities: all with _TEMPLATE_P, or a subset renormalised."""
    if templates is None:
        return TEMPLATES, _TEMPLATE_P
    p = np.array([_TEMPLATE_P[TEMPLATES.index(t)] for t in templates])
    return templates, tuple(p / p.sum())


def scene_and_caption(index: int, split: str, *, seed: int = 0,
                      templates: tuple[str, ...] | None = None) -> tuple[Scene, str]:
    """The scene and caption at `index` of `split`, a pure function of (index, split, seed, templates).

    train: any template; never a held-out combination (see HELDOUT_*) anywhere in the scene, never a val scene.
    val: same distribution as train, restricted to the 1/VAL_FRACTION_DENOM of scene identities train never uses.
    heldout: every scene contains a held-out combination and its caption states it.
    templates (train and val only): draw only these caption templates, in the proportions they have among all of
    them, e.g. ("relation",) for a stream of two-object relation scenes to oversample them. Such a stream has its
    own random draws: it does not repeat the scenes of the full stream at the same indices.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    templates = check_templates(templates, split)
    key = [seed, SPLITS.index(split), index]
    if templates is not None:  # 1 + template numbers: never the full stream's key
        key += [1 + TEMPLATES.index(t) for t in templates]
    rng = np.random.default_rng(key)
    if split == "heldout":
        return _sample_heldout(rng)
    names, p = _template_weights(templates)
    while True:
        template = names[int(rng.choice(len(names), p=p))]
        scene, caption = _sample(rng, template=template)
        if not scene_has_heldout(scene) and in_val_partition(scene) == (split == "val"):
            return scene, caption


# ----------------------------------------------------------------------------------------------- Dataset

def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style shapes dataset generated on the fly: item i is a pure function of (split, seed, templates, i), so a
    stream resumes exactly from any index. Items: {"image": (3, H, W) float32 in [-1, 1], "caption": str,
    "key": "shapes/{split}/s{seed}/{i:07d}"} ("shapes/{split}+{templates}/s{seed}/..." for a template-restricted
    stream, see `scene_and_caption`)."""

    def __init__(self, split: str = "train", *, resolution: int = 32, size: int | None = None, seed: int = 0,
                 templates: tuple[str, ...] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution={resolution} is not supported; expected one of {RESOLUTIONS}")
        if size is not None and size < 1:
            raise ValueError(f"size={size} must be >= 1")
        self.templates = check_templates(templates, split)
        self.split, self.resolution, self.seed = split, resolution, seed
        self.size = SPLIT_SIZES[split] if size is None else size
        self.stream = split if self.templates is None else f"{split}+{','.join(self.templates)}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.size}")
        scene, caption = scene_and_caption(index, self.split, seed=self.seed, templates=self.templates)
        return {"image": image_to_tensor(render(scene, self.resolution)), "caption": caption,
                "key": f"shapes/{self.stream}/s{self.seed}/{index:07d}"}
