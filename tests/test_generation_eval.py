"""Scoring generated images: prompt sets hold the right kinds, and scores are exact on known-correct/wrong images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from argen.cli import main
from argen.data.shapes import HELDOUT_COLOR_SHAPE, parse_caption, render, scene_and_caption
from argen.eval.generation import HELDOUT_PARTS, heldout_part, judge_images, prompt_kind, prompt_set, score
from argen.eval.judge import corrupt_scene


def test_prompt_sets_are_distinct_and_of_their_kind():
    single = prompt_set("single", max_prompts=100)
    assert len(single) == len(set(single)) == 16  # every distinct single-object val caption (seed 0)
    assert all(prompt_kind(parse_caption(p)) == "single" for p in single)
    relation = prompt_set("relation", max_prompts=50)
    assert len(set(relation)) == 50 and all(parse_caption(p).relation is not None for p in relation)
    heldout = prompt_set("heldout", max_prompts=50)
    held_pairs = {f"{c} {s}" for c, s in HELDOUT_COLOR_SHAPE}
    assert any(any(pair in p for pair in held_pairs) for p in heldout)
    with pytest.raises(ValueError, match="kind='lists'"):
        prompt_set("lists", max_prompts=3)


def test_scores_count_correct_and_wrong_images_exactly():
    generator = np.random.default_rng(0)
    prompts, images, wrong_kinds = [], [], []
    for i in range(40):
        scene, caption = scene_and_caption(i, "val")
        prompts.append(caption)
        images.append(render(scene, 32))
        wrong = corrupt_scene(scene, parse_caption(caption), kind="color", generator=generator)
        if wrong is not None and len(wrong_kinds) < 10:
            prompts.append(caption)
            images.append(render(wrong, 32))
            wrong_kinds.append(caption)
    s = score(prompts, judge_images(prompts, images))
    assert s.num_images == len(images)
    assert s.accuracy == pytest.approx(40 / len(images))
    assert s.attributes["color"] < 1.0 and s.attributes["count"] == 1.0
    assert len(s.failures) == min(8, len(wrong_kinds))
    with pytest.raises(ValueError, match="one prompt per image"):
        judge_images(prompts[:2], images[:3])


def test_demo_overrides_must_name_their_experiment():
    with pytest.raises(SystemExit, match="tokenizer.KEY=VALUE"):
        main(["demo", "-o", "/nonexistent", "train.max_steps=3"])


def test_demo_train_scenes_reach_the_settings(monkeypatch, capsys):
    import argen.demo

    seen = {}
    monkeypatch.setattr(argen.demo, "run_demo", lambda out, **kw: seen.update(out=out, **kw))
    main(["demo", "-o", "somewhere", "--train-scenes", "1234", "gpt.train.max_steps=3"])
    assert seen["settings"].num_train_codes == 1234 and seen["gpt_overrides"] == ("train.max_steps=3",)
    main(["demo", "-o", "somewhere"])
    assert seen["settings"].num_train_codes == argen.demo.DemoSettings().num_train_codes
    with pytest.raises(SystemExit):
        main(["demo", "-o", "somewhere", "--train-scenes", "0"])
    assert "argument --train-scenes: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert seen["settings"].extra_train_codes == argen.demo.DemoSettings().extra_train_codes
    main(["demo", "-o", "somewhere", "--extra-scenes", "relation=7", "list,count=3"])
    assert seen["settings"].extra_train_codes == {"relation": 7, "list,count": 3}
    main(["demo", "-o", "somewhere", "--extra-scenes"])
    assert seen["settings"].extra_train_codes == {}
    for bad in ("relation", "relation=0", "relations=5"):
        with pytest.raises(SystemExit, match=f"--extra-scenes takes TEMPLATES=N with N >= 1, got '{bad}'"):
            main(["demo", "-o", "somewhere", "--extra-scenes", bad])


def test_code_diversity_is_zero_for_copies_and_the_share_of_differing_tokens_otherwise():
    import torch

    from argen.eval.generation import code_diversity

    codes = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 0, 0], [5, 5, 5, 5]])
    assert code_diversity(codes[:2], ["a", "a"]) == 0.0
    assert code_diversity(codes[1:3], ["a", "a"]) == 0.5
    assert code_diversity(codes, ["a", "a", "b", "b"]) == (0.0 + 1.0) / 2
    assert code_diversity(codes[:2], ["a", "b"]) is None


def test_heldout_part_names_the_combination_each_heldout_scene_was_built_around():
    parts = Counter()
    for i in range(300):
        scene, caption = scene_and_caption(i, "heldout")
        has_pair = any((o.color, o.shape) in HELDOUT_COLOR_SHAPE for o in scene.objects)
        part = heldout_part(caption)
        assert part == HELDOUT_PARTS[0 if has_pair else 1], caption
        parts[part] += 1
    assert set(parts) == set(HELDOUT_PARTS)  # both kinds occur in the split
