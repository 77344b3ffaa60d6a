"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant) with weights read only from a local file.

Weights are never downloaded. A user fetches two public files once and converts them into one safetensors file:

    python -m tokenizers_img.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth -o lpips_vgg.safetensors

See HOW_TO_GET_WEIGHTS for where the two files come from.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from tokenizers_img.serialization import atomic_write_bytes

HOW_TO_GET_WEIGHTS = """\
LPIPS needs one local weights file; nothing is downloaded. Build it once from two public files:
  1. VGG16 ImageNet weights from torchvision (BSD-3):
       https://download.pytorch.org/models/vgg16-397923af.pth
  2. LPIPS v0.1 linear heads for VGG (BSD-2), file lpips/weights/v0.1/vgg.pth of the `lpips` package:
       https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth
       (or `pip download lpips --no-deps` and unzip the wheel)
  3. python -m tokenizers_img.lpips convert --vgg vgg16-397923af.pth --lin vgg.pth -o lpips_vgg.safetensors
Then point the config at it, for example loss.lpips_path=lpips_vgg.safetensors."""

# VGG16 configuration "D" (Simonyan & Zisserman 2015): conv widths, "M" = 2x2 max-pool. LPIPS stops at relu5_3,
# so the last pool is left out. Built in torchvision's layer order so `features.{i}` indices match its files.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: indices of those ReLUs in `features`.
_TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS' input scaling layer: the ImageNet mean/std expressed for [-1, 1] inputs, (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # added to the channel norm before unit-normalising features, as in the LPIPS paper's code


def _build_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, int(item), 3, padding=1), nn.ReLU()]
            ch = int(item)
    return nn.Sequential(*layers)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in our LPIPS safetensors layout."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = LPIPS()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class LPIPS(nn.Module):
    """Learned perceptual distance: (B, 3, H, W) x, y in [-1, 1] -> (B,) float32 distances >= 0.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 ), f_l = VGG16 relu{1_2,...,5_3},
    unit-normalised over channels, w_l >= 0 the learned per-channel head (Zhang et al. 2018, eq. 1).

    Frozen: every parameter has requires_grad=False and the module stays in eval mode even when a parent calls
    .train(); gradients still flow to the inputs. Computed in float32 with autocast off. Build it with
    `LPIPS.from_file(path)`; `LPIPS()` alone has random weights (for tests).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _build_vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """No-op: LPIPS is a fixed metric and always runs in eval mode."""
        return self

    @classmethod
    def from_file(cls, path: str | Path | None, *, device: str | torch.device = "cpu") -> "LPIPS":
        """Load our safetensors layout strictly (every key, every shape). Missing file -> error with instructions."""
        if path is None or str(path) == "":
            raise FileNotFoundError("No LPIPS weights path given.\n" + HOW_TO_GET_WEIGHTS)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights file {str(path)!r} does not exist.\n" + HOW_TO_GET_WEIGHTS)
        if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            raise ValueError(
                f"{str(path)!r} is a torch pickle, not our LPIPS safetensors file. Convert the torchvision and "
                "lpips files first:\n" + HOW_TO_GET_WEIGHTS
            )
        try:
            state = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for a non-safetensors file
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err}).\n" + HOW_TO_GET_WEIGHTS) from err
        _check_layout(state, expected_shapes(), what=f"LPIPS weights {str(path)!r}")
        model = cls()
        model.load_state_dict(state, strict=True)
        return model.to(device)

    def _normalised_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAP_INDICES:
                norm = torch.sqrt(torch.sum(h * h, dim=1, keepdim=True))  # (B, 1, h, w)
                taps.append(h / (norm + _NORM_EPS))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] (H, W >= 16) -> (B,) float32 distances."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float(), y.float()
            # One trunk pass over [x; y]: the trunk has no batch coupling, so this equals two passes.
            taps = self._normalised_taps(torch.cat([x, y]))
            dist = x.new_zeros(x.shape[0])
            for head, f in zip(self.heads, taps):
                fx, fy = f.chunk(2)
                dist = dist + head((fx - fy) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return dist


def _check_layout(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing keys {missing[:6]}" if missing else "", f"unexpected keys {unexpected[:6]}" if unexpected else ""]
        details += [f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}" for k in wrong[:6]]
        raise ValueError(f"{what} do not match the expected layout: " + "; ".join(d for d in details if d) + ".")


# ---- conversion from the files users can obtain -------------------------------------------------------------

_LIN_KEY = re.compile(r"^lin(\d)\.model\.(\d)\.weight$")


def convert_state_dicts(vgg_state: dict[str, torch.Tensor], lin_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision's VGG16 state dict + the lpips package's v0.1 VGG heads to our key names.

    vgg_state: torchvision `vgg16` keys `features.{i}.weight|bias` (13 convs) and `classifier.*` (dropped, not
    checked). lin_state: `lin{k}.model.1.weight` (k = 0..4, shape (1, C_k, 1, 1); `model.0` when saved without
    the dropout layer). Anything else, or a wrong shape (vgg16_bn, alexnet heads, swapped files), raises.
    """
    shapes = expected_shapes()
    if any(_LIN_KEY.match(k) for k in vgg_state) or any(k.startswith("features.") for k in lin_state):
        raise ValueError("the VGG and LPIPS-head files look swapped: pass torchvision's vgg16-*.pth as --vgg and lpips' vgg.pth as --lin.")

    vgg = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
    vgg_expected = {k: s for k, s in shapes.items() if k.startswith("features.")}
    _check_layout(vgg, vgg_expected, what="the VGG16 state dict (expected torchvision's vgg16-397923af.pth, not vgg16_bn)")

    heads: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in lin_state.items():
        m = _LIN_KEY.match(key)
        if m is None or m.group(2) not in ("0", "1"):
            unexpected.append(key)
            continue
        heads[f"heads.{m.group(1)}.weight"] = value
    if unexpected:
        raise ValueError(f"the LPIPS heads state dict has unexpected keys {sorted(unexpected)[:6]}; expected lin0..lin4.model.1.weight from lpips/weights/v0.1/vgg.pth.")
    heads_expected = {k: s for k, s in shapes.items() if k.startswith("heads.")}
    _check_layout(heads, heads_expected, what="the LPIPS heads state dict (expected lpips/weights/v0.1/vgg.pth, not alex.pth or squeeze.pth)")

    out = {**vgg, **heads}
    return {k: out[k].detach().to(torch.float32).contiguous() for k in sorted(out)}


def convert_files(vgg_path: str | Path, lin_path: str | Path, out_path: str | Path) -> Path:
    """Read the two torch files with weights_only=True, convert, and write one safetensors file atomically."""
    states = []
    for flag, p in (("--vgg", vgg_path), ("--lin", lin_path)):
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"{flag} file {str(p)!r} does not exist.\n" + HOW_TO_GET_WEIGHTS)
        state = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{flag} file {str(p)!r} is not a plain state dict of tensors.")
        states.append(state)
    tensors = convert_state_dicts(*states)
    meta = {"format": "argen-lpips-vgg16", "format_version": "1", "vgg_source": Path(vgg_path).name, "lin_source": Path(lin_path).name}
    out_path = Path(out_path)
    atomic_write_bytes(out_path, safetensors.torch.save(tensors, metadata=meta))
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizers_img.lpips", description="LPIPS weights tools.", epilog=HOW_TO_GET_WEIGHTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="build lpips_vgg.safetensors from torchvision's VGG16 and lpips' vgg.pth")
    conv.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    conv.add_argument("--lin", required=True, help="lpips/weights/v0.1/vgg.pth")
    conv.add_argument("-o", "--output", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    try:
        out = convert_files(args.vgg, args.lin, args.output)
        LPIPS.from_file(out)  # read back strictly before declaring success
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
