"""`argen demo`: `argen train pipeline` (argen.recipe) on the built-in shapes world at 32 px with the shapes judge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from argen.configs import resolve as resolve_config
from argen.recipe import SHAPES_PRESETS, RecipeSettings, run_recipe

TOKENIZER_CONFIG = resolve_config("tokenizer", SHAPES_PRESETS[0])
GPT_CONFIG = resolve_config("gpt", SHAPES_PRESETS[1])


@dataclass
class DemoSettings(RecipeSettings):
    """RecipeSettings with the demo's defaults: 40,000 training scenes of every caption template (a little more,
    with the 40,000 extra relation scenes, than the GPT's 2400 x 32 draws, so the encode stage spends no time on
    scenes it never uses), and no judge CLIP: the rule-based shapes judge scores every image."""

    num_train_codes: int | None = 40_000
    judge_clip: bool = False


def run_demo(out: str | Path = "demo", *, tokenizer_overrides: tuple[str, ...] = (), gpt_overrides: tuple[str, ...] = (),
             settings: DemoSettings | None = None) -> dict:
    """Train the shapes tokenizer, the BPE and the GPT (each reused when already finished), then sample a fixed
    prompt set with a CFG sweep, score every image with the judge and write out/report.md (+ JSON and PNGs).

    `tokenizer_overrides` / `gpt_overrides` are `key.path=value` settings for the two YAML experiments.
    """
    overrides = (*(f"tokenizer.{o}" for o in tokenizer_overrides), *(f"gpt.{o}" for o in gpt_overrides))
    return run_recipe(out, dataset="shapes", resolution=32, overrides=overrides, settings=settings or DemoSettings(),
                      kind="demo", title="argen demo")
