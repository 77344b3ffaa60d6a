"""What every saved argen directory shares: one error type, one manifest reader and one training-record reader.

A manifest (pipeline.json, unclip.json) names its format and version and lists its parts, each with a relative
path and a hash. A trained model's config.json carries, under TRAINED_WITH_KEY, what it was trained with (the
hashes of its tokenizers or its CLIP), which is how a pipeline refuses parts that do not belong together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokenizers_img.serialization import read_json_object, read_pretrained_config

TRAINED_WITH_KEY = "_trained_with"


class SavedDirError(ValueError):
    """A saved directory is missing, damaged, from another format, or used with parts it was not trained with."""


def read_manifest(file: Path, *, format: str, version: int, classes: Mapping[str, str], required: tuple[str, ...],
                  what: str, error: type[SavedDirError] = SavedDirError,
                  upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(manifest, its parts) of a manifest file, checked: the format and version, every `required` part present, and
    each part one of `classes` (part name -> class) with a string "path", that "class" and a string "hash"; `error`
    naming `file` and what is wrong otherwise (`what` names the saved thing, e.g. "pipeline"). `upgrade` translates
    the format's version - 1 (no version: 1), in memory: the file is not rewritten."""
    manifest = read_json_object(file)
    if upgrade is not None and manifest.get("format") == format and manifest.get("format_version", 1) == version - 1:
        manifest = upgrade(manifest)
    if manifest.get("format") != format or manifest.get("format_version") != version:
        raise error(f"{file} has format {manifest.get('format')!r} v{manifest.get('format_version')}; this argen reads "
                    f"{format!r} v{version}.")
    parts = manifest.get("parts")
    if not isinstance(parts, dict):
        raise error(f"{file} has no 'parts' table: the file is damaged; rebuild it.")
    missing = [name for name in required if name not in parts]
    if missing:
        raise error(f"{file} lists no {', '.join(map(repr, missing))} part: the file is damaged; rebuild it.")
    for name, part in parts.items():
        if not (isinstance(part, dict) and all(isinstance(part.get(k), str) for k in ("path", "class", "hash"))):
            raise error(f"{file}: part {name!r} needs a 'path', a 'class' and a 'hash', got {part!r}: the file is "
                        "damaged; rebuild it.")
        if name not in classes:
            raise error(f"{file}: part {name!r} is not one a {what} has; its parts are {sorted(classes)}.")
        if part["class"] != classes[name]:
            raise error(f"{file}: part {name!r} is a {part['class']}, but a {what}'s {name} is a {classes[name]}.")
    return manifest, parts


def parts_from_v1(manifest: dict[str, Any], *, classes: Mapping[str, str], version: int) -> dict[str, Any]:
    """A format-1 manifest read as `version`: the same hashes, but each under "hash" (format 1 also wrote "sha256")
    and with its part's class."""
    parts = {name: {**{k: v for k, v in part.items() if k != "sha256"}, "hash": part.get("hash", part.get("sha256")),
                    "class": classes.get(name, "?")} if isinstance(part, dict) else part
             for name, part in (manifest.get("parts") or {}).items()}
    return {**manifest, "format_version": version, "parts": parts}


def trained_with(model_dir: str | Path, *, needs: tuple[str, ...], made_by: str,
                 error: type[SavedDirError] = SavedDirError) -> dict[str, Any]:
    """The training record in a saved model's config.json, checked to hold the keys `needs`; `error` says which
    command (`made_by`) writes a model that has one."""
    record = read_pretrained_config(model_dir).get(TRAINED_WITH_KEY)
    if not isinstance(record, dict) or any(k not in record for k in needs):
        raise error(f"{str(model_dir)!r} does not record what it was trained with ({', '.join(needs)} under "
                    f"'{TRAINED_WITH_KEY}' in its config.json), so its pairing cannot be checked. Use one written by "
                    f"{made_by}.")
    return record
