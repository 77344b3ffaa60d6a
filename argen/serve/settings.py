"""The web page's settings: form fields generated from the sampler dataclasses, and the checked job and edit requests."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import shlex
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from PIL import Image

from argen.edit import EditConfig, GridMask, mask_pixels
from argen.sample import MAX_CFG_SCALE, MAX_SEED, MAX_TEMPERATURE, MAX_WINDOW, SamplingConfig

MAX_IMAGES = 64  # images per column and job: seconds on a laptop CPU for the demo GPT, longer for unCLIP
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 200  # diffusion steps of the unCLIP prior and decoder


class SettingsError(ValueError):
    """A setting from the page is missing, malformed or out of range; the message names it, its value and the fix."""


@dataclass(frozen=True)
class FormField:
    """One input of the settings form: `kind` "int", "float", "bool" or "choice"; `optional` inputs may be left empty
    (None). `minimum`/`maximum` bound the input on the page; the dataclass the value goes to validates it again."""

    name: str
    label: str
    kind: str
    default: Any
    optional: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def parse(self, raw: Any, *, where: str) -> Any:
        """The value of `raw` (a JSON value or the input's text); SettingsError naming the field and the value."""
        if isinstance(raw, str):
            raw = raw.strip()
        if raw is None or raw == "":
            if self.optional:
                return None
            raise SettingsError(f"{where} {self.label} is empty: enter {self._expected()}.")
        value = self._convert(raw, where=where)
        low_ok = self.minimum is None or value >= self.minimum
        high_ok = self.maximum is None or value <= self.maximum
        if self.kind in ("int", "float") and not (low_ok and high_ok):
            raise SettingsError(f"{where} {self.label} must be {self._expected()}, got {raw!r}.")
        return value

    def _convert(self, raw: Any, *, where: str) -> Any:
        bad = SettingsError(f"{where} {self.label} must be {self._expected()}, got {raw!r}.")
        if self.kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "on", "1", "false", "off", "0"):
                return str(raw).lower() in ("true", "on", "1")
            raise bad
        if self.kind == "choice":
            if raw not in self.choices:
                raise bad
            return raw
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise bad
        try:
            value = float(raw) if self.kind == "float" else int(raw)
        except (ValueError, OverflowError):
            raise bad from None
        if self.kind == "float" and not math.isfinite(value):
            raise bad
        if self.kind == "int" and isinstance(raw, float) and raw != value:
            raise bad
        return value

    def _expected(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        what = "an integer" if self.kind == "int" else "a number"
        show = lambda x: str(x) if isinstance(x, int) else f"{x:g}"
        if self.minimum is not None and self.maximum is not None:
            what += f" in [{show(self.minimum)}, {show(self.maximum)}]"
        elif self.minimum is not None:
            what += f" >= {show(self.minimum)}"
        return what + (" (or empty for none)" if self.optional else "")

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# How the page shows SamplingConfig's fields (label, bounds, help). A field added to SamplingConfig appears on the
# page without an entry here, under its own name, as long as its type is int, float, bool or a Literal of strings.
SAMPLER_FIELD_LOOKS: dict[str, dict[str, Any]] = {
    "temperature": dict(label="temperature", minimum=0.0, maximum=MAX_TEMPERATURE, help="0 is greedy"),
    "top_k": dict(label="top-k", minimum=1, help="keep the k most likely codes; empty keeps all"),
    "top_p": dict(label="top-p", minimum=0.0, maximum=1.0, help="nucleus; empty keeps all"),
    "cfg_scale": dict(label="CFG scale", minimum=0.0, maximum=MAX_CFG_SCALE, help="classifier-free guidance; 1 is off"),
    "cfg_schedule": dict(label="CFG schedule", help="linear ramps guidance from 1 at the first token"),
    "decoding": dict(label="decoding", help="token: one token per forward pass; jacobi / spatial: speculative Jacobi "
                                            "decoding, several per pass, the same distribution"),
    "window": dict(label="draft window", minimum=1, maximum=MAX_WINDOW, help="draft tokens checked per pass (jacobi / spatial)"),
}


def _field_kind(annotation: Any) -> tuple[str, bool, tuple[str, ...]] | None:
    """(kind, optional, choices) of a dataclass field's type, or None for a type the form cannot show."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        optional, annotation = True, args[0]
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return ("choice", optional, tuple(choices)) if all(isinstance(c, str) for c in choices) else None
    kinds = {bool: "bool", int: "int", float: "float"}
    return (kinds[annotation], optional, ()) if annotation in kinds else None


def sampler_fields(defaults: SamplingConfig) -> list[FormField]:
    """The GPT sampler's form fields, one per SamplingConfig field whose type the form can show, prefilled from
    `defaults`."""
    hints = typing.get_type_hints(SamplingConfig)
    fields = []
    for f in dataclasses.fields(SamplingConfig):
        kind = _field_kind(hints[f.name])
        if kind is None:
            continue
        looks = SAMPLER_FIELD_LOOKS.get(f.name, dict(label=f.name.replace("_", " ")))
        fields.append(FormField(name=f.name, kind=kind[0], optional=kind[1], choices=kind[2],
                                default=getattr(defaults, f.name), **looks))
    return fields


def unclip_fields() -> list[FormField]:
    """The unCLIP columns' form fields (shared by every prior), prefilled from the unCLIP sampler defaults."""
    from argen.unclip.pipeline import DecoderSampling

    decoder = DecoderSampling()
    return [
        # DDIM 10 matched 25 steps on val (argen compare's default), at a third of the prior's cost
        FormField("prior_steps", "prior steps", "int", 10, minimum=1, maximum=MAX_STEPS, help="diffusion prior (DDIM)"),
        FormField("prior_cfg", "prior CFG", "float", 1.0, minimum=0.0, maximum=MAX_CFG_SCALE, help="both priors"),
        FormField("decoder_steps", "decoder steps", "int", decoder.steps, minimum=1, maximum=MAX_STEPS,
                  help=f"decoder ({decoder.sampler})"),
        FormField("decoder_cfg", "decoder CFG", "float", decoder.cfg_scale, minimum=0.0, maximum=MAX_CFG_SCALE),
    ]


@dataclass(frozen=True)
class SystemInfo:
    """One column of the page: `id` names it in URLs, `family` is "gpt" or "unclip", `path` its pipeline directory,
    `resolution` the side of its images in pixels and `grid` the side of its code grid (token pipelines: an inpainting
    mask is snapped outward to it)."""

    id: str
    name: str
    family: str
    path: str
    resolution: int | None = None
    grid: int | None = None


# The per-image edits: tool -> the family of the columns whose images it takes.
EDIT_TOOLS = {"inpaint": "gpt", "variations": "unclip"}
FAMILY_NAMES = {"gpt": "AR token GPT", "unclip": "unCLIP"}
EDIT_CONFIG = EditConfig()  # how the page inpaints: argen.edit's default method ("resample") and its settings


@dataclass(frozen=True)
class EditRequest:
    """What an edit job starts from: image `index` of column `column` in job `job` (its PNG bytes `image`), and the
    `tool` applied to it. "inpaint" regenerates `region` (the mask as drawn, True = regenerate, snapped outward to
    the code grid: argen.edit.GridMask over one image) under the request's prompt with EDIT_CONFIG; "variations" decodes
    the image's CLIP image embedding again (argen.unclip.controls.variations)."""

    tool: str
    job: str
    column: str
    index: int
    image: bytes
    region: GridMask | None = None

    def mask_box(self) -> list[int]:
        """The bounding box (x0, y0, x1, y1) of the mask as drawn, in pixels, x1 and y1 exclusive."""
        ys, xs = self.region.requested[0].nonzero(as_tuple=True)
        return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]

    def mask_png(self) -> bytes:
        """The mask as drawn: a greyscale PNG of the image's size, white = regenerate (what `argen edit --mask` reads)."""
        buf = io.BytesIO()
        Image.fromarray(self.region.requested[0].numpy().astype("uint8") * 255, mode="L").save(buf, format="PNG")
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        """What the page shows of the edit: the tool, its source and, for inpainting, the snapped region."""
        out: dict[str, Any] = {"tool": self.tool, "job": self.job, "column": self.column, "index": self.index}
        if self.region is not None:
            out.update(region=self.region.describe(0), mask_box=self.mask_box(),
                       cells=self.region.cells[0].int().tolist())
        return out

    def record(self) -> dict[str, Any]:
        """The edit's settings, as downloaded with its images (source.png and mask.png are in the zip)."""
        out: dict[str, Any] = {"tool": self.tool, "source": {"job": self.job, "column": self.column, "index": self.index,
                                                             "file": "source.png"}}
        if self.region is not None:
            out.update(mask_file="mask.png", mask_box=self.mask_box(), region=self.region.describe(0),
                       **self.region.as_dict(0), config=dataclasses.asdict(EDIT_CONFIG))
        return out


@dataclass(frozen=True)
class JobRequest:
    """A checked request: `n` images per column of `prompt` ("" is the unconditional GPT) under `seed`, from the
    columns `systems`, with the GPT sampler `sampling` and the unCLIP settings `unclip` (field name -> value).
    With `edit`, the job edits one earlier image instead (one column: the image's)."""

    prompt: str
    n: int
    seed: int
    sampling: SamplingConfig
    unclip: dict[str, Any]
    systems: tuple[str, ...]
    edit: EditRequest | None = None


N_FIELD = FormField("n", "number of images", "int", 8, minimum=1, maximum=MAX_IMAGES,
                    help=f"per column; at most {MAX_IMAGES} (`argen sample -n` makes more)")
SEED_FIELD = FormField("seed", "seed", "int", 0, minimum=0, maximum=MAX_SEED, help="same seed, same images")


class Form:
    """The page's form for a set of columns: what /api/config sends and how a submitted job is checked."""

    def __init__(self, systems: Sequence[SystemInfo], *, defaults: SamplingConfig) -> None:
        if not systems:
            raise ValueError("the page needs at least one pipeline to sample from.")
        self.systems = list(systems)
        self.defaults = defaults
        self.gpt = sampler_fields(defaults)
        self.unclip = unclip_fields() if any(s.family == "unclip" for s in systems) else []

    def as_json(self) -> dict[str, Any]:
        return {"systems": [dataclasses.asdict(s) for s in self.systems], "max_images": MAX_IMAGES,
                "max_prompt_chars": MAX_PROMPT_CHARS, "fields": {
                    "job": [N_FIELD.as_json(), SEED_FIELD.as_json()],
                    "gpt": [f.as_json() for f in self.gpt], "unclip": [f.as_json() for f in self.unclip]}}

    def parse(self, data: Any) -> JobRequest:
        """A JobRequest from the submitted JSON object; SettingsError with a message for the page otherwise."""
        if not isinstance(data, dict):
            raise SettingsError(f"the request must be a JSON object of settings, got {type(data).__name__}.")
        prompt = _prompt(data.get("prompt", ""))
        n = N_FIELD.parse(data.get("n", N_FIELD.default), where="the")
        seed = SEED_FIELD.parse(data.get("seed", SEED_FIELD.default), where="the")
        known = {s.id for s in self.systems}
        systems = data.get("systems", [s.id for s in self.systems])
        if not isinstance(systems, list) or not all(isinstance(s, str) for s in systems):
            raise SettingsError(f"systems must be a list of column ids, got {systems!r}.")
        if unknown := [s for s in systems if s not in known]:
            raise SettingsError(f"unknown column(s) {unknown}; this server has {sorted(known)}.")
        if not systems:
            raise SettingsError("choose at least one model to sample from.")
        sampling = self._sampling(data.get("gpt", {}))
        unclip = self._group(self.unclip, data.get("unclip", {}), where="unCLIP")
        order = [s.id for s in self.systems if s.id in systems]
        return JobRequest(prompt=prompt, n=n, seed=seed, sampling=sampling, unclip=unclip, systems=tuple(order))

    def parse_edit(self, tool: str, data: Any, *, job: str, column: str, index: int, image: bytes) -> JobRequest:
        """A JobRequest applying `tool` (EDIT_TOOLS) to image `index` of `column` in job `job` (PNG bytes `image`),
        from the submitted JSON object; SettingsError with a message for the page otherwise.

        inpaint: {"prompt", "mask" (a PNG of the image's size, white = regenerate, as a data: URL or base64) or
        "box" ([x0, y0, x1, y1] pixels, x1 and y1 exclusive), "n", "seed", "gpt": {sampler}}.
        variations: {"n", "seed", "unclip": {the unCLIP fields; the decoder's are used}}."""
        if tool not in EDIT_TOOLS:
            raise SettingsError(f"unknown edit {tool!r}; this server has {sorted(EDIT_TOOLS)}.")
        system = next((s for s in self.systems if s.id == column), None)
        if system is None:
            raise SettingsError(f"unknown column {column!r}; this server has {[s.id for s in self.systems]}.")
        if system.family != EDIT_TOOLS[tool]:
            takes = ", ".join(s.id for s in self.systems if s.family == EDIT_TOOLS[tool]) or "none on this server"
            raise SettingsError(f"{tool} edits images of the {FAMILY_NAMES[EDIT_TOOLS[tool]]} columns ({takes}); "
                                f"{column!r} is not one.")
        if not isinstance(data, dict):
            raise SettingsError(f"the {tool} request must be a JSON object of settings, got {type(data).__name__}.")
        known = {"inpaint": {"prompt", "mask", "box", "n", "seed", "gpt"}, "variations": {"n", "seed", "unclip"}}[tool]
        if unknown := sorted(set(data) - known):
            raise SettingsError(f"unknown {tool} setting(s) {unknown}; known: {sorted(known)}.")
        n = N_FIELD.parse(data.get("n", N_FIELD.default), where="the")
        seed = SEED_FIELD.parse(data.get("seed", SEED_FIELD.default), where="the")
        source = dict(tool=tool, job=job, column=column, index=index, image=image)
        if tool == "variations":
            unclip = self._group(self.unclip, data.get("unclip", {}), where="unCLIP")
            return JobRequest(prompt="", n=n, seed=seed, sampling=self.defaults, unclip=unclip, systems=(column,),
                              edit=EditRequest(**source))
        prompt = _prompt(data.get("prompt", ""))
        region = GridMask.snap(_mask(data.get("mask"), data.get("box"), resolution=system.resolution),
                               grid=system.grid)
        return JobRequest(prompt=prompt, n=n, seed=seed, sampling=self._sampling(data.get("gpt", {})), unclip={},
                          systems=(column,), edit=EditRequest(**source, region=region))

    def _group(self, fields: list[FormField], values: Any, *, where: str) -> dict[str, Any]:
        if not isinstance(values, dict):
            raise SettingsError(f"the {where} settings must be a JSON object, got {type(values).__name__}.")
        names = {f.name for f in fields}
        if unknown := sorted(set(values) - names):
            raise SettingsError(f"unknown {where} setting(s) {unknown}; known: {sorted(names)}.")
        return {f.name: f.parse(values[f.name], where=where) if f.name in values else f.default for f in fields}

    def _sampling(self, values: Any) -> SamplingConfig:
        chosen = self._group(self.gpt, values, where="GPT")
        try:
            return dataclasses.replace(self.defaults, **chosen)
        except ValueError as err:  # SamplingConfig's own checks name the value and its range
            raise SettingsError(f"GPT sampler: {err}") from None


def _prompt(prompt: Any) -> str:
    """The submitted prompt, stripped; SettingsError when it is not text, too long or not valid Unicode."""
    if not isinstance(prompt, str):
        raise SettingsError(f"the prompt must be text, got {type(prompt).__name__}.")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise SettingsError(f"the prompt has {len(prompt)} characters; the page takes at most {MAX_PROMPT_CHARS}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingsError("the prompt is not valid Unicode text (it holds a lone surrogate); retype it.") from None
    return prompt


def _mask(mask: Any, box: Any, *, resolution: int):
    """The pixels (R, R) bool to regenerate, from exactly one of `mask` (a PNG of the image's size as a data: URL or
    base64; white, > 127 in grey, is regenerated) and `box` ([x0, y0, x1, y1] pixels); SettingsError otherwise,
    an empty mask included."""
    from argen.data.transforms import load_image

    if (mask is None) == (box is None):
        raise SettingsError("give exactly one of a mask (a PNG image, white = regenerate) and a box [x0, y0, x1, y1].")
    if box is not None:
        if not (isinstance(box, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise SettingsError(f"the box must be a list of four numbers [x0, y0, x1, y1] in pixels, got {box!r}.")
        try:
            return mask_pixels(box=box, resolution=resolution)
        except ValueError as err:
            raise SettingsError(str(err)) from None
    if not isinstance(mask, str):
        raise SettingsError(f"the mask must be a PNG image as a data: URL or base64 text, got {type(mask).__name__}.")
    try:
        data = base64.b64decode(mask.split(",", 1)[1] if mask.startswith("data:") else mask, validate=True)
        with Image.open(io.BytesIO(data), formats=["PNG"]) as header:  # reads the header only
            size = header.size
    except (binascii.Error, ValueError, IndexError, OSError):
        raise SettingsError("the mask is not a PNG image in base64 (a data:image/png;base64,... URL or its base64 "
                            "part).") from None
    if size != (resolution, resolution):
        raise SettingsError(f"the mask is {size[0]}x{size[1]} px, but the image is {resolution}x{resolution}: give a "
                            "mask of the image's size.")
    try:
        pixels = mask_pixels(mask=load_image(data, name="the mask"), resolution=resolution)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    if not pixels.any():
        raise SettingsError("the mask is empty: paint over the part of the image to regenerate (white in a mask "
                            "image), then inpaint.")
    return pixels


# How the `argen sample` / `argen edit` options spell the sampler's fields, and what they read as None (off).
SAMPLER_OPTIONS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "cfg_scale": "--cfg",
                   "cfg_schedule": "--cfg-schedule", "decoding": "--decoding", "window": "--window"}
SAMPLER_OFF = {"top_k": "0", "top_p": "1"}


def _sampler_args(sampling: SamplingConfig) -> list[str] | None:
    """The GPT sampler as command-line options, every field given (so the pipeline's recommendation does not fill
    any in), or None when a setting has no option."""
    plain = SamplingConfig()
    args = []
    for f in dataclasses.fields(SamplingConfig):
        value = getattr(sampling, f.name)
        if f.name not in SAMPLER_OPTIONS:
            if value != getattr(plain, f.name):
                return None
        elif value is None:
            if f.name not in SAMPLER_OFF:
                return None
            args += [SAMPLER_OPTIONS[f.name], SAMPLER_OFF[f.name]]
        else:
            args += [SAMPLER_OPTIONS[f.name], f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def sample_command(system: SystemInfo, request: JobRequest) -> str | None:
    """The `argen sample` command that makes the same images as `system`'s column (the `argen edit` command for an
    edit job, see `edit_command`), or None when a setting has no command-line option."""
    if request.edit is not None:
        return edit_command(system, request)
    base = ["argen", "sample", "--pipeline", system.path, request.prompt, "-n", str(request.n), "--seed", str(request.seed)]
    if system.family == "unclip":
        u = request.unclip
        return shlex.join(base + ["--prior", system.id.removeprefix("unclip-"), "--cfg", f"{u['decoder_cfg']:g}",
                                  "--prior-cfg", f"{u['prior_cfg']:g}", "--prior-steps", str(u["prior_steps"]),
                                  "--decoder-steps", str(u["decoder_steps"])])
    args = _sampler_args(request.sampling)
    return None if args is None else shlex.join(base + args)


def edit_command(system: SystemInfo, request: JobRequest) -> str | None:
    """The `argen edit` command that makes the same images as the edit job `request`, run where the zip's source.png
    and mask.png lie; None when a setting has no command-line option."""
    edit = request.edit
    common = ["-n", str(request.n), "--seed", str(request.seed), "--image", "source.png"]
    if edit.tool == "variations":
        u = request.unclip
        return shlex.join(["argen", "edit", "variations", "--unclip", system.path, *common, "--cfg",
                           f"{u['decoder_cfg']:g}", "--decoder-steps", str(u["decoder_steps"])])
    args = _sampler_args(request.sampling)
    if args is None:
        return None
    c = EDIT_CONFIG
    method = ["--method", c.method, "--proposals", str(c.proposals), "--passes", str(c.passes), "--candidates",
              str(c.candidates), *(["--no-paste"] if not c.paste else [])]
    return shlex.join(["argen", "edit", "inpaint", "--pipeline", system.path, request.prompt, *common, "--mask",
                       "mask.png", *method, *args])
