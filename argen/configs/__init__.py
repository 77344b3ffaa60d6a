"""The YAML presets shipped with argen (tokenizer/, gpt/, unclip/), and the lookup that lets a command name one."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def presets(kind: str) -> list[str]:
    """The preset names of one kind ("tokenizer", "gpt", "unclip"), e.g. ["real_256", "real_64", "shapes_32", ...]."""
    return sorted(p.stem for p in (ROOT / kind).glob("*.yaml"))


def resolve(kind: str, name: str) -> Path:
    """A YAML file: `name` itself when it is a file, else the shipped preset of that name (`shapes_32`,
    `shapes_32.yaml` or `gpt/shapes_32.yaml`). An unknown name is a FileNotFoundError listing the presets."""
    path = Path(name)
    if path.is_file():
        return path
    preset = ROOT / kind / Path(name).name
    preset = preset if preset.suffix == ".yaml" else preset.with_suffix(".yaml")
    if preset.is_file():
        return preset
    raise FileNotFoundError(f"{name} is neither a YAML file nor a {kind} preset; presets: {', '.join(presets(kind))} "
                            f"(in {ROOT / kind}).")
