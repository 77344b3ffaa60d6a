"""LPIPS: metric properties with random weights, strict loading, and conversion from torchvision/lpips files."""

import pytest
import safetensors.torch
import torch

from tokenizers_img.lpips import LPIPS, convert_files, main

# torchvision vgg16: conv layers sit at these `features.{i}` indices, with (in, out) channels
TV_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
            17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}
LIN_CHANNELS = (64, 128, 256, 512, 512)


def _fake_torchvision_vgg16(g: torch.Generator) -> dict:
    sd = {}
    for i, (cin, cout) in TV_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    for j in (0, 3, 6):  # the classifier is dropped by the converter; tiny stand-ins keep the test light
        sd[f"classifier.{j}.weight"] = torch.zeros(2, 2)
        sd[f"classifier.{j}.bias"] = torch.zeros(2)
    return sd


def _fake_lpips_heads(g: torch.Generator) -> dict:
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CHANNELS)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random weights in the two upstream layouts, torch.save'd, converted by the CLI to our safetensors file."""
    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg, lin = _fake_torchvision_vgg16(g), _fake_lpips_heads(g)
    torch.save(vgg, d / "vgg16-397923af.pth")
    torch.save(lin, d / "vgg.pth")
    assert main(["convert", "--vgg", str(d / "vgg16-397923af.pth"), "--lin", str(d / "vgg.pth"), "-o", str(d / "lpips_vgg.safetensors")]) == 0
    return d, vgg, lin


def _images(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_converter_maps_torchvision_and_lpips_keys(converted):
    d, vgg, lin = converted
    model = LPIPS.from_file(d / "lpips_vgg.safetensors")
    sd = model.state_dict()
    for i in TV_CONVS:
        assert torch.equal(sd[f"features.{i}.weight"], vgg[f"features.{i}.weight"])
        assert torch.equal(sd[f"features.{i}.bias"], vgg[f"features.{i}.bias"])
    for k in range(5):
        assert torch.equal(sd[f"heads.{k}.weight"], lin[f"lin{k}.model.1.weight"])
    assert not any(k.startswith("classifier") for k in safetensors.torch.load_file(d / "lpips_vgg.safetensors"))


def test_metric_properties_and_frozen(converted):
    model = LPIPS.from_file(converted[0] / "lpips_vgg.safetensors")
    x, y = _images(1), _images(2)
    assert torch.equal(model(x, x), torch.zeros(2))
    d_xy, d_yx = model(x, y), model(y, x)
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    assert torch.equal(d_xy, d_yx)
    assert model(x, (x + 0.05 * y).clamp(-1, 1)).mean() < d_xy.mean()  # a small change is nearer than a new image

    xg = x.clone().requires_grad_(True)
    model(xg, y).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    torch.nn.Sequential(model).train()  # a parent switching to train mode does not unfreeze the metric
    assert not model.training
    if hasattr(torch, "autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x, y).dtype == torch.float32


def test_missing_or_wrong_files_give_clear_errors(converted, tmp_path):
    d, vgg, lin = converted
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS.from_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="No LPIPS weights path"):
        LPIPS.from_file(None)
    with pytest.raises(ValueError, match="Convert"):
        LPIPS.from_file(d / "vgg.pth")

    state = safetensors.torch.load_file(d / "lpips_vgg.safetensors")
    del state["heads.4.weight"]
    state["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['heads.4.weight'\].*unexpected keys \['extra.weight'\]"):
        LPIPS.from_file(tmp_path / "bad.safetensors")

    # swapped files, vgg16_bn (shifted indices + BN stats), and AlexNet heads are all refused by name
    with pytest.raises(ValueError, match="swapped"):
        convert_files(d / "vgg.pth", d / "vgg16-397923af.pth", tmp_path / "o.safetensors")
    bn = {k.replace("features.28.", "features.40."): v for k, v in vgg.items()}
    bn["features.1.running_mean"] = torch.zeros(64)
    torch.save(bn, tmp_path / "vgg16_bn.pth")
    with pytest.raises(ValueError, match="not vgg16_bn"):
        convert_files(tmp_path / "vgg16_bn.pth", d / "vgg.pth", tmp_path / "o.safetensors")
    alex = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(alex, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="not alex.pth"):
        convert_files(d / "vgg16-397923af.pth", tmp_path / "alex.pth", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
