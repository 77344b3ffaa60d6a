"""VQModel invariants: shapes per downsample factor, encode/decode == forward, strict save/load, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from tokenizers_img import VQConfig, VQModel
from tokenizers_img.config import from_dict, to_dict
from tokenizers_img.vq_model import structure_and_colour


def tiny(**kw) -> VQConfig:
    args = dict(
        resolution=16, base_channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
        codebook_size=32, codebook_dim=4, dead_code_threshold=2,
    )
    args.update(kw)
    return VQConfig(**args)


def images(batch: int = 2, res: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_shapes_for_each_downsample_factor(ch_mult, factor):
    torch.manual_seed(0)
    cfg = tiny(resolution=32, ch_mult=ch_mult, attn=factor == 16)
    assert cfg.downsample == factor and cfg.grid_size == 32 // factor
    model = VQModel(cfg)
    x = images(res=32)
    out = model(x)
    g = cfg.grid_size
    assert out.reconstruction.shape == x.shape
    assert out.quantizer_output.quantized.shape == (2, cfg.code_dim, g, g)
    assert out.quantizer_output.indices.shape == (2, g, g)
    codes = model.encode(x)
    assert codes.shape == (2, g, g) and codes.dtype == torch.int64
    assert model.decode(codes).shape == x.shape


@pytest.mark.parametrize("quantizer, encoder, colour_codes", [("vq", "conv", 0), ("fsq", "conv", 0), ("vq", "patch", 0),
                                                               ("vq", "patch", 4), ("vq", "conv", 4)])
def test_reconstruction_gradient_reaches_the_encoder(quantizer, encoder, colour_codes):
    torch.manual_seed(0)
    model = VQModel(tiny(quantizer=quantizer, fsq_levels=(4, 3, 3), encoder=encoder, colour_codes=colour_codes))
    out = model(images())
    ((out.reconstruction - images()) ** 2).mean().backward()
    first = model.encoder.conv_in if encoder == "conv" else model.encoder.embed
    colour = [model.colour_encoder[0].weight] if colour_codes else []
    for p in (first.weight, model.quant_conv.weight, model.last_decoder_layer, *colour):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.last_decoder_layer is model.decoder.conv_out.weight


@pytest.mark.parametrize(
    "kw", [dict(quantizer="vq"), dict(quantizer="vq", l2_normalize=False, ema=True), dict(quantizer="fsq"),
           dict(colour_codes=4, encoder="patch")]
)
def test_encode_decode_equals_forward(kw):
    torch.manual_seed(0)
    model = VQModel(tiny(**kw))
    x = images(batch=3)
    model.train()(x)  # k-means init and statistics, so the codebook is not the random one
    model.eval()
    out = model(x)
    codes = model.encode(x)
    assert torch.equal(codes, out.quantizer_output.indices)
    assert torch.allclose(model.decode(codes), out.reconstruction, atol=1e-5)
    flat = codes.flatten(1)  # (B, h*w), the GPT's layout
    assert torch.allclose(model.decode(flat), out.reconstruction, atol=1e-5)
    # reconstruct: the same, clamped to [-1, 1], whatever the batches it is computed in
    whole = model.reconstruct(x)
    assert torch.allclose(whole, out.reconstruction.clamp(-1, 1), atol=1e-5)
    assert torch.allclose(model.reconstruct(x, batch_size=2), whole, atol=1e-6) and not whole.requires_grad


@pytest.mark.parametrize("encoder, local", [("patch", True), ("conv", False)])
def test_a_patch_encoder_code_depends_on_its_own_patch_only(encoder, local):
    torch.manual_seed(0)
    model = VQModel(tiny(encoder=encoder)).eval()  # f = 4: a 4 x 4 grid of 4 x 4 px patches
    x = images(batch=1)
    y = x.clone()
    y[..., 8:, 8:] = images(batch=1, seed=1)[..., 8:, 8:]  # repaint the bottom-right 2 x 2 patches
    with torch.no_grad():
        zx, zy = model._latents(x), model._latents(y)
    untouched = torch.ones(4, 4, dtype=torch.bool)
    untouched[2:, 2:] = False
    assert not torch.equal(zx[..., ~untouched], zy[..., ~untouched])
    assert torch.equal(zx[..., untouched], zy[..., untouched]) == local  # GroupNorm and 3x3 convs see further


def test_encode_never_changes_quantizer_state():
    torch.manual_seed(0)
    model = VQModel(tiny()).train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(images())
    after = model.quantizer.state_dict()
    assert not bool(after["initialized"])
    assert all(torch.equal(before[k], after[k]) for k in before)


def flat_object(colour: tuple[float, float, float]) -> torch.Tensor:
    """A 16 px black image with a flat-coloured disc whose anti-aliased edge crosses several 4 x 4 patches."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    cover = ((((yy - 7.3) ** 2 + (xx - 8.6) ** 2).sqrt() - 5).neg().clamp(0, 1) * 16).round() / 16
    return (cover * torch.tensor(colour)[:, None, None]) * 2 - 1  # (3, 16, 16), black background


def test_structure_is_the_same_in_every_colour_and_colour_is_the_brightest_pixel():
    orange, cyan = flat_object((0.98, 0.51, 0.08)), flat_object((0.12, 0.84, 0.88))
    structure, colour = structure_and_colour(torch.stack([orange, cyan]), 4)
    assert structure.shape == (2, 1, 16, 16) and colour.shape == (2, 3, 4, 4)
    torch.testing.assert_close(structure[0], structure[1])
    assert structure.amin() == -1 and structure.amax() == 1  # black background, the brightest pixel of a patch
    torch.testing.assert_close(colour[0, :, 1, 2], orange[:, 6, 8])  # a patch inside the disc: the object's colour


def test_a_colour_codebook_recolours_an_object_without_changing_its_structure():
    """Codes are (structure, colour) pairs: recolouring a flat object leaves the structure latents as they were (to
    float rounding) and moves the colour latents of the patches it covers."""
    torch.manual_seed(0)
    model = VQModel(tiny(colour_codes=8, encoder="patch")).eval()
    batch = torch.stack([flat_object(c) for c in ((0.98, 0.51, 0.08), (0.12, 0.84, 0.88), (0.9, 0.2, 0.9))])
    with torch.no_grad():
        z = model._latents(batch)  # (3, 8, 4, 4): structure channels, then colour channels
    torch.testing.assert_close(z[1:, :4], z[:1, :4].expand(2, -1, -1, -1))
    covered = (batch[0] > -1).any(0).view(4, 4, 4, 4).any(3).any(1)  # (4, 4): the patches the disc touches
    moved = (z[1:, 4:] - z[:1, 4:]).abs().amax(dim=1) > 1e-3  # (2, 4, 4)
    assert torch.equal(moved, covered.expand(2, -1, -1))


@pytest.mark.parametrize("colour_codes", [0, 4])
def test_save_load_roundtrip_is_exact(tmp_path, colour_codes):
    torch.manual_seed(0)
    model = VQModel(tiny(ema=True, colour_codes=colour_codes))
    for s in range(3):  # k-means init, EMA and usage counters move away from their initial values
        model.train()(images(seed=s))
    model.eval()
    vqs = (model.quantizer.first, model.quantizer.second) if colour_codes else (model.quantizer,)
    assert all(bool(vq.initialized) for vq in vqs) and vqs[0].steps_since_used.max() > 0
    model.save_pretrained(tmp_path / "vq")
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config and not loaded.training
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys()
    for k in sd:
        assert torch.equal(sd[k], lsd[k]), k
    x = images(seed=9)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)


def test_from_pretrained_rejects_other_classes_and_mismatched_weights(tmp_path):
    torch.manual_seed(0)
    VQModel(tiny(ema=True)).save_pretrained(tmp_path / "vq")
    cfg_path = tmp_path / "vq" / "config.json"
    raw = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**raw, "_class_name": "GPT"}))
    with pytest.raises(ValueError, match="GPT checkpoint, not a VQModel"):
        VQModel.from_pretrained(tmp_path / "vq")

    cfg_path.write_text(json.dumps({**raw, "ema": False}))  # EMA buffers become unexpected keys
    with pytest.raises(ValueError, match="unexpected keys.*cluster_size"):
        VQModel.from_pretrained(tmp_path / "vq")

    cfg_path.write_text(json.dumps({**raw, "num_res_blocks": 2}))  # more blocks -> missing keys
    with pytest.raises(ValueError, match="missing keys"):
        VQModel.from_pretrained(tmp_path / "vq")


def test_config_derived_sizes_and_dict_roundtrip():
    cfg = tiny(quantizer="fsq", fsq_levels=(8, 5, 5, 5))
    assert (cfg.num_codes, cfg.code_dim, cfg.downsample, cfg.grid_size) == (1000, 4, 4, 4)
    assert tiny().num_codes == 32 and tiny().code_dim == 4
    assert tiny(colour_codes=5).num_codes == 32 * 5 and tiny(colour_codes=5).code_dim == 8
    again = from_dict(VQConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg and isinstance(again.ch_mult, tuple)
    default = VQConfig()
    assert (default.downsample, default.grid_size, default.num_codes) == (16, 16, 16384)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(resolution=18), r"resolution=18 is not divisible by the downsample factor 4"),
        (dict(ch_mult=(1, 2)), r"ch_mult=\(1, 2\) gives downsample factor 2; it must be 4, 8 or 16"),
        (dict(ch_mult=(1, 1, 1, 1, 1, 1), resolution=64), r"downsample factor 32"),
        (dict(base_channels=6), r"channel widths \[6\] \(base_channels=6.*norm_groups=4"),
        (dict(quantizer="fsq", fsq_levels=(8, 1)), r"fsq_levels.*\(8, 1\)"),
        (dict(codebook_size=1), r"codebook_size must be >= 2, got 1"),
        (dict(ema_decay=1.0), r"ema_decay must be in \(0, 1\), got 1.0"),
        (dict(dead_code_threshold=-1), r"dead_code_threshold must be >= 0.*got -1"),
        (dict(quantizer="lfq"), r"'vq' or 'fsq', got 'lfq'"),
        (dict(encoder="vit"), r"encoder must be 'conv' or 'patch', got 'vit'"),
        (dict(colour_codes=1), r"colour_codes=1: a colour codebook needs colour_codes >= 2"),
        (dict(colour_codes=4, quantizer="fsq"), r"colour_codes=4: .*quantizer 'vq' \(got 'fsq'\)"),
    ],
)
def test_config_validation_messages_print_the_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny(**kw)


def test_boundary_errors_name_the_values():
    model = VQModel(tiny()).eval()
    with pytest.raises(ValueError, match=r"H and W divisible by 4, got shape \(1, 3, 18, 16\)"):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\), got min 0, max 40"):
        model.decode(torch.tensor([[0, 40], [1, 2]]).view(1, 2, 2))
    with pytest.raises(ValueError, match=r"square grid, got N=15"):
        model.decode(torch.zeros(1, 15, dtype=torch.long))
