"""Tests for the shapes world: determinism, splits, held-out combinations, caption grammar, Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from argen.data.shapes import (
    COLORS,
    HELDOUT_COLOR_SHAPE,
    HELDOUT_RELATIONS,
    POSITIONS,
    RESOLUTIONS,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    Relation,
    Scene,
    ShapeObject,
    ShapesDataset,
    in_val_partition,
    parse_caption,
    relation_holds,
    render,
    scene_and_caption,
    scene_has_heldout,
    scene_key,
)


def test_render_shape_dtype_and_background():
    scene = Scene((ShapeObject("circle", "red", "large", "center"),))
    for res in RESOLUTIONS:
        img = render(scene, res)
        assert img.shape == (res, res, 3) and img.dtype == np.uint8
        assert (img[0, 0] == 0).all() and tuple(img[res // 2, res // 2]) == COLORS["red"]
    with pytest.raises(ValueError, match="resolution=48"):
        render(scene, 48)


def test_scene_and_caption_deterministic_by_index():
    for split in ("train", "val", "heldout"):
        a = [scene_and_caption(i, split, seed=3) for i in (0, 7, 123)]
        b = [scene_and_caption(i, split, seed=3) for i in (123, 7, 0)][::-1]
        assert a == b
    assert [scene_and_caption(i, "train", seed=0) for i in range(20)] != \
           [scene_and_caption(i, "train", seed=1) for i in range(20)]


def test_generated_scenes_are_valid_and_captions_true():
    for split in ("train", "val", "heldout"):
        for i in range(300):
            scene, caption = scene_and_caption(i, split)
            assert 1 <= len(scene.objects) <= 3
            assert len({o.position for o in scene.objects}) == len(scene.objects)
            spec = parse_caption(caption)
            assert len(spec.objects) == len(scene.objects)
            # the caption is true of its own scene (object i is described by spec i in generation order)
            assert all(s.matches(o) for s, o in zip(spec.objects, scene.objects)), (caption, scene)
            if spec.relation is not None:
                r = spec.relation
                assert relation_holds(r.kind, scene.objects[r.subject].position, scene.objects[r.object].position)


def test_train_never_contains_heldout_or_val_scenes():
    keys_train = set()
    for i in range(5000):
        scene, _ = scene_and_caption(i, "train")
        assert not scene_has_heldout(scene), scene
        assert not in_val_partition(scene)
        keys_train.add(scene_key(scene))
    for i in range(300):
        scene, _ = scene_and_caption(i, "val")
        assert not scene_has_heldout(scene) and scene_key(scene) not in keys_train


def test_heldout_scenes_contain_and_state_a_heldout_combination():
    for i in range(300):
        scene, caption = scene_and_caption(i, "heldout")
        assert scene_has_heldout(scene)
        spec = parse_caption(caption)
        pairs = {(s.color, s.shape) for s in spec.objects}
        stated_relation = False
        if spec.relation is not None:
            a, b = spec.objects[spec.relation.subject], spec.objects[spec.relation.object]
            for ca, rel, cb in HELDOUT_RELATIONS:
                converse = {"above": "below", "left of": "right of"}[rel]
                stated_relation |= (a.color, spec.relation.kind, b.color) in ((ca, rel, cb), (cb, converse, ca))
        assert stated_relation or any(p in pairs for p in HELDOUT_COLOR_SHAPE), caption


def test_scene_has_heldout_detects_relation_triples():
    green_top = ShapeObject("circle", "green", "small", "top right")
    magenta_bottom = ShapeObject("square", "magenta", "small", "bottom left")
    assert scene_has_heldout(Scene((green_top, magenta_bottom)))
    assert not scene_has_heldout(Scene((ShapeObject("circle", "green", "small", "bottom"), magenta_bottom)))
    assert scene_has_heldout(Scene((ShapeObject("triangle", "orange", "large", "center"),)))


def test_relations_on_grid_cells():
    assert relation_holds("left of", "bottom left", "top")  # columns only
    assert not relation_holds("left of", "top", "bottom")  # same column
    assert relation_holds("above", "top right", "center") and relation_holds("below", "bottom", "left")
    assert relation_holds("right of", "right", "center")


@pytest.mark.parametrize("caption, spec", [
    ("a large red circle in the top left", CaptionSpec((ObjectSpec("circle", "red", "large", "top left"),))),
    ("A small green triangle at the bottom.", CaptionSpec((ObjectSpec("triangle", "green", "small", "bottom"),))),
    ("an orange square", CaptionSpec((ObjectSpec("square", "orange"),))),
    ("a small circle in the middle", CaptionSpec((ObjectSpec("circle", None, "small", "center"),))),
    ("two blue squares", CaptionSpec((ObjectSpec("square", "blue"),) * 2)),
    ("three large white triangles", CaptionSpec((ObjectSpec("triangle", "white", "large"),) * 3)),
    ("a red square to the left of a blue circle",
     CaptionSpec((ObjectSpec("square", "red"), ObjectSpec("circle", "blue")), Relation("left of", 0, 1))),
    ("a small green triangle above a yellow circle",
     CaptionSpec((ObjectSpec("triangle", "green", "small"), ObjectSpec("circle", "yellow")), Relation("above", 0, 1))),
    ("a red circle on the left, a cyan square in the top right corner and a white triangle at the bottom",
     CaptionSpec((ObjectSpec("circle", "red", None, "left"), ObjectSpec("square", "cyan", None, "top right"),
                  ObjectSpec("triangle", "white", None, "bottom")))),
])
def test_parse_caption_examples(caption, spec):
    assert parse_caption(caption) == spec


def test_caption_round_trip_covers_all_templates():
    """Every generated caption parses; the parsed spec describes the scene; all templates occur."""
    seen = set()
    for i in range(400):
        scene, caption = scene_and_caption(i, "train")
        spec = parse_caption(caption)
        n_attrs = sum(getattr(spec.objects[0], a) is not None for a in ("color", "size", "position"))
        kind = ("relation" if spec.relation else "count" if len(set(spec.objects)) == 1 < len(spec.objects)
                else "list" if len(spec.objects) > 1 else f"single{n_attrs}")
        seen.add(kind)
    assert {"relation", "count", "list", "single3", "single2", "single1"} <= seen


@pytest.mark.parametrize("caption, message", [
    ("", "empty caption"),
    ("   ", "empty caption"),
    ("a purple circle", r"unknown word\(s\) \['purple'\].*vocabulary"),
    ("a red hexagon near the top", r"\['hexagon', 'near'\]"),
    ("red circle", "expected an article or number"),
    ("a red", "expected a shape"),
    ("two red circle", "plural shape"),
    ("two red circles above a blue square", "must be one object"),
    ("two red circles in the center", "cannot share one position"),
    ("a red circle in the top and a blue square at the top", "same position"),
])
def test_parse_caption_errors(caption, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(caption)


def test_shape_object_validates_vocabulary():
    with pytest.raises(ValueError, match="color='purple'"):
        ShapeObject("circle", "purple", "small", "top")


def test_dataset_items_and_resume():
    ds = ShapesDataset("train", resolution=32)
    assert len(ds) == 1_000_000 and len(ShapesDataset("val")) == 2000 and len(ShapesDataset("heldout")) == 1000
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].min() == -1
    scene, caption = scene_and_caption(5, "train")
    assert item["caption"] == caption and item["key"] == "shapes/train/s0/0000005"
    assert torch.equal(ShapesDataset("train", resolution=32)[5]["image"], item["image"])  # exact resume by index
    small = ShapesDataset("val", resolution=64, size=10)
    assert len(small) == 10 and small[9]["caption"] == ShapesDataset("val")[9]["caption"]
    with pytest.raises(IndexError):
        small[10]
    with pytest.raises(ValueError, match="split='test'"):
        ShapesDataset("test")


def test_vocabulary_contract():
    assert SHAPES == ("circle", "square", "triangle") and SIZES == ("small", "large") and len(POSITIONS) == 9
    assert set(COLORS) == {"red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"}


def test_template_restricted_stream_draws_only_those_templates_with_the_split_rules():
    relation = [scene_and_caption(i, "train", templates=("relation",)) for i in range(400)]
    for scene, caption in relation:
        spec = parse_caption(caption)
        assert len(scene.objects) == 2 and spec.relation is not None, caption
        assert not scene_has_heldout(scene) and not in_val_partition(scene)
    val = [scene_and_caption(i, "val", templates=("relation",))[0] for i in range(50)]
    assert all(in_val_partition(s) and len(s.objects) == 2 for s in val)
    # two templates: only those two, both drawn
    specs = [parse_caption(scene_and_caption(i, "train", templates=("count", "relation"))[1]) for i in range(200)]
    is_count = [s.relation is None and len(s.objects) > 1 and len(set(s.objects)) == 1 for s in specs]
    is_relation = [s.relation is not None for s in specs]
    assert all(a != b for a, b in zip(is_count, is_relation)) and 40 < sum(is_relation) < 160
    # its own draws: not the full stream's relation scenes at the same indices
    full = [scene_and_caption(i, "train") for i in range(400)]
    shared = sum(a == b for a, b in zip(relation, full))
    assert shared <= 2, shared


def test_template_names_are_checked():
    for bad in (("relations",), (), ("relation", "relation")):
        with pytest.raises(ValueError, match="templates must be distinct names from single_full"):
            scene_and_caption(0, "train", templates=bad)
    with pytest.raises(ValueError, match="heldout"):
        ShapesDataset("heldout", templates=("relation",))
    ds = ShapesDataset("train", templates=["relation", "count"])
    assert ds.templates == ("count", "relation") and ds[3]["key"] == "shapes/train+count,relation/s0/0000003"
    assert ds[3]["caption"] == scene_and_caption(3, "train", templates=("count", "relation"))[1]
