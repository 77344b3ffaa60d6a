"""Tests for the shapes judge: it reads its renders back, tolerates degradation and rejects wrong images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data.shapes import RESOLUTIONS, Scene, ShapeObject, image_to_tensor, parse_caption, render, scene_and_caption
from argen.eval.judge import CORRUPTIONS, corrupt_scene, degrade, judge, parse


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_parse_reads_renders_back(res):
    n = {32: 200, 64: 100, 128: 50}[res]
    for i in range(n):
        scene, caption = scene_and_caption(i, "val")
        image = render(scene, res)
        found = parse(image)
        assert sorted(found.objects, key=repr) == sorted(scene.objects, key=repr), (caption, found.describe())
        assert judge(caption, image).correct


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_degraded_renders_read_back(res):
    generator = np.random.default_rng(0)
    n = {32: 300, 64: 150, 128: 80}[res]
    ok = sum(judge(c, degrade(render(s, res), generator=generator)).correct
             for s, c in (scene_and_caption(i, "val", seed=1) for i in range(n)))
    assert ok / n >= 0.97


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_wrong_images_are_rejected(kind):
    generator = np.random.default_rng(1)
    tried = 0
    for i in range(60):
        scene, caption = scene_and_caption(i, "val")
        wrong = corrupt_scene(scene, parse_caption(caption), kind=kind, generator=generator)
        if wrong is None:
            continue
        tried += 1
        for res in (32, 64):
            result = judge(caption, render(wrong, res))
            assert not result.correct, (kind, caption, wrong.describe())
            assert result.reason
    assert tried >= 20


def test_attributes_name_what_is_wrong():
    image = render(Scene((ShapeObject("circle", "red", "large", "top left"),)), 32)
    ok = judge("a large red circle in the top left", image)
    assert ok.correct and ok.reason == ""
    assert ok.attributes == {"count": True, "color": True, "shape": True, "size": True, "position": True,
                             "relation": None}
    r = judge("a large blue circle in the top left", image)
    assert not r.correct and r.attributes["color"] is False and r.attributes["shape"] is True
    r = judge("a small red circle at the bottom", image)
    assert r.attributes["size"] is False and r.attributes["position"] is False and r.attributes["color"] is True
    r = judge("two red circles", image)
    assert r.attributes["count"] is False and "expected 2 object(s), found 1" in r.reason
    assert judge("a red circle", image).attributes["position"] is None


def test_relations_judged_both_ways():
    scene = Scene((ShapeObject("square", "red", "small", "left"), ShapeObject("circle", "blue", "large", "top right")))
    image = render(scene, 64)
    assert judge("a red square to the left of a blue circle", image).correct
    assert judge("a blue circle above a red square", image).correct
    r = judge("a red square to the right of a blue circle", image)
    assert not r.correct and r.attributes["relation"] is False and r.attributes["color"] is True


def test_blank_image_has_no_objects():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert parse(blank).objects == ()
    assert judge("a red circle", blank).attributes["count"] is False


def test_accepts_pil_torch_and_in_between_sizes():
    scene, caption = scene_and_caption(3, "val")
    image = render(scene, 64)
    assert judge(caption, Image.fromarray(image)).correct
    assert judge(caption, image_to_tensor(image)).correct
    resized = np.asarray(Image.fromarray(render(scene, 128)).resize((96, 96), Image.BILINEAR))
    assert judge(caption, resized).correct


@pytest.mark.parametrize("image, message", [
    (np.zeros((16, 16, 3), np.uint8), r"side in \[32, 128\].*16x16"),
    (np.zeros((64, 48, 3), np.uint8), "64x48"),
    (np.zeros((64, 64, 3), np.float32), "dtype=float32"),
    (np.zeros((64, 64), np.uint8), r"shape=\(64, 64\)"),
    (torch.zeros(64, 64, 3), r"shape=\(64, 64, 3\)"),
    ([[0]], "got list"),
])
def test_bad_images_raise(image, message):
    with pytest.raises(ValueError, match=message):
        parse(image)


def test_bad_caption_raises():
    image = render(Scene((ShapeObject("circle", "red", "large", "center"),)), 32)
    with pytest.raises(ValueError, match="unknown word"):
        judge("a red blob", image)
    with pytest.raises(ValueError, match="empty caption"):
        judge("", image)


def test_degrade_is_seeded_and_bounded():
    image = render(scene_and_caption(0, "val")[0], 32)
    a = degrade(image, generator=np.random.default_rng(5))
    assert np.array_equal(a, degrade(image, generator=np.random.default_rng(5)))
    assert a.dtype == np.uint8 and a.shape == image.shape and not np.array_equal(a, image)
    with pytest.raises(ValueError, match="uint8"):
        degrade(image.astype(np.float32), generator=np.random.default_rng(0))


def test_binding_errors_are_attributes_on_the_wrong_objects():
    from argen.eval.judge import binding_error

    caption = "a small red circle above a small blue square"
    right = Scene((ShapeObject("circle", "red", "small", "top"), ShapeObject("square", "blue", "small", "center")))
    swapped = Scene((ShapeObject("circle", "blue", "small", "top"), ShapeObject("square", "red", "small", "center")))
    missing = Scene((ShapeObject("circle", "green", "small", "top"), ShapeObject("square", "blue", "small", "center")))
    one = Scene((ShapeObject("circle", "red", "small", "top"),))
    verdicts = [binding_error(judge(caption, render(scene, 64))) for scene in (right, swapped, missing, one)]
    assert verdicts == [False, True, False, False]
    assert binding_error(judge("a small red circle in the top", render(one, 64))) is None
