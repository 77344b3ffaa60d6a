"""VQGAN losses: hinge values, gradient routing, the adaptive weight, the GAN schedule and the discriminator."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizers_img.config import ConfigError, from_dict
from tokenizers_img.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from tokenizers_img.losses import VQGANLoss, VQGANLossConfig, gan_schedule

ON = dict(disc_start=0, disc_d_only_steps=0, disc_ramp_steps=0, disc_weight=0.5)  # GAN fully on at step 0


class FirstChannel(nn.Module):
    """A stand-in discriminator whose logits are the images' first channel, so logits can be set by hand."""

    def forward(self, x):
        return x[:, :1]


def _setup(seed=0, size=32):
    """A toy decoder: reconstructions = 1x1 conv(latent) with `weight` as the last layer."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    latent = torch.randn(2, 4, size, size, generator=g)
    weight = nn.Parameter(torch.randn(3, 4, 1, 1, generator=g) * 0.3)
    torch.manual_seed(seed)
    disc = PatchDiscriminator(PatchDiscriminatorConfig(base_channels=8, n_layers=2))
    return images, latent, weight, disc


def test_hinge_and_vanilla_discriminator_loss_on_hand_logits():
    real = torch.tensor([2.0, 0.5, -1.0]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    fake = torch.tensor([-2.0, 0.0, 1.5]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    hinge = VQGANLoss(VQGANLossConfig(**ON)).discriminator_loss(real, fake, step=0, discriminator=FirstChannel())
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6; 0.5 * (5/6 + 7/6) = 1
    assert hinge.total.item() == pytest.approx(1.0)
    assert hinge.logits_real.item() == pytest.approx(0.5) and hinge.logits_fake.item() == pytest.approx(-1 / 6)
    vanilla = VQGANLoss(VQGANLossConfig(**ON, disc_loss="vanilla")).discriminator_loss(real, fake, step=0, discriminator=FirstChannel())
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v))).item()
    expected = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(1.5)) / 3)
    assert vanilla.total.item() == pytest.approx(expected)
    before = VQGANLoss(VQGANLossConfig(**{**ON, "disc_start": 5})).discriminator_loss(real, fake, step=4, discriminator=FirstChannel())
    assert before.total.item() == 0.0 and before.disc_factor == 0.0


def test_discriminator_loss_trains_only_the_discriminator():
    images, latent, weight, disc = _setup()
    rec = F.conv2d(latent, weight)
    out = VQGANLoss(VQGANLossConfig(**ON)).discriminator_loss(images, rec, step=0, discriminator=disc)
    out.total.backward()
    assert weight.grad is None
    assert all(p.grad is not None for p in disc.parameters())


def test_generator_loss_grads_reach_reconstruction_not_discriminator():
    images, latent, weight, disc = _setup()
    rec = F.conv2d(latent, weight)
    rec.retain_grad()
    out = VQGANLoss(VQGANLossConfig(**ON)).generator_loss(images, rec, quantizer_loss=torch.tensor(0.1), last_layer=weight, step=0, discriminator=disc)
    out.total.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert rec.grad is not None and weight.grad is not None
    assert out.g_adv.item() != 0 and out.d_weight.item() > 0 and out.disc_factor == 0.5


def test_adaptive_weight_equals_hand_ratio_and_is_clamped():
    images, latent, weight, disc = _setup(seed=1)
    rec = F.conv2d(latent, weight)
    # by hand: L1 nll and hinge generator loss, gradients w.r.t. the last layer
    nll = (images - rec).abs().mean()
    g_adv = -disc(rec).mean()
    g_nll, = torch.autograd.grad(nll, weight, retain_graph=True)
    g_g, = torch.autograd.grad(g_adv, weight, retain_graph=True)
    ratio = (g_nll.norm() / (g_g.norm() + 1e-4)).item()
    q = torch.tensor(0.25)

    out = VQGANLoss(VQGANLossConfig(**ON)).generator_loss(images, rec, quantizer_loss=q, last_layer=weight, step=0, discriminator=disc)
    assert out.d_weight.item() == pytest.approx(ratio, rel=1e-5)
    assert out.g_adv.item() == pytest.approx(g_adv.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(nll.item() + 0.25 + ratio * 0.5 * g_adv.item(), rel=1e-5)

    cap = ratio / 3
    clamped = VQGANLoss(VQGANLossConfig(**ON, adaptive_weight_max=cap)).generator_loss(
        images, rec, quantizer_loss=q, last_layer=weight, step=0, discriminator=disc)
    assert clamped.d_weight.item() == pytest.approx(cap)

    with torch.no_grad():  # eval: no gradients -> the documented fallback 0, not a crash
        ev = VQGANLoss(VQGANLossConfig(**ON)).generator_loss(
            images, F.conv2d(latent, weight), quantizer_loss=q, last_layer=weight, step=0, discriminator=disc)
    assert ev.d_weight.item() == 0.0 and ev.g_adv.item() == pytest.approx(g_adv.item(), rel=1e-6)

    with pytest.raises(ValueError, match="last_layer"):
        VQGANLoss(VQGANLossConfig(**ON)).generator_loss(
            images, rec, quantizer_loss=q, last_layer=nn.Parameter(torch.ones(1)), step=0, discriminator=disc)


def test_generator_loss_before_gan_start_skips_discriminator_and_is_fp32():
    images, latent, weight, _ = _setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = F.conv2d(latent, weight)
        out = VQGANLoss(VQGANLossConfig(rec_loss="l2")).generator_loss(
            images, rec, quantizer_loss=torch.tensor(0.5, dtype=torch.bfloat16), last_layer=weight, step=0,
            discriminator=None)  # never called before disc_start
    assert rec.dtype == torch.bfloat16 and out.total.dtype == torch.float32
    assert out.total.item() == pytest.approx((images - rec.float()).pow(2).mean().item() + 0.5, rel=1e-5)
    assert out.disc_factor == 0.0 and out.d_weight.item() == 0.0 and out.perceptual.item() == 0.0
    with pytest.raises(ValueError, match="discriminator is None"):
        VQGANLoss(VQGANLossConfig(**ON)).generator_loss(
            images, rec, quantizer_loss=torch.tensor(0.0), last_layer=weight, step=0, discriminator=None)


def test_gan_schedule_boundaries():
    cfg = VQGANLossConfig(disc_start=10, disc_d_only_steps=5, disc_ramp_steps=4, disc_weight=0.8)
    got = {s: gan_schedule(s, cfg) for s in (0, 9, 10, 14, 15, 16, 17, 19, 1000)}
    assert got[0] == got[9] == (0.0, 0.0)
    assert got[10] == got[14] == got[15] == (1.0, 0.0)  # discriminator alone; the ramp starts from 0 at step 15
    assert got[16] == pytest.approx((1.0, 0.2)) and got[17] == pytest.approx((1.0, 0.4))
    assert got[19] == pytest.approx((1.0, 0.8)) and got[1000] == pytest.approx((1.0, 0.8))
    jump = VQGANLossConfig(disc_start=10, disc_d_only_steps=5, disc_ramp_steps=0, disc_weight=0.8)
    assert gan_schedule(14, jump) == (1.0, 0.0) and gan_schedule(15, jump) == (1.0, 0.8)
    assert gan_schedule(0, VQGANLossConfig(**ON)) == (1.0, 0.5)
    assert gan_schedule(10**6, VQGANLossConfig(disc_weight=0.0)) == (0.0, 0.0)


def test_config_validation_and_missing_lpips_weights(tmp_path):
    with pytest.raises(ConfigError, match="disc_start"):
        from_dict(VQGANLossConfig, {"disc_start": -1})
    with pytest.raises(ConfigError, match="disc_strat"):
        from_dict(VQGANLossConfig, {"disc_strat": 5})
    with pytest.raises(ValueError, match="(?s)needs lpips_path.*tokenizers_img.lpips convert"):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0, lpips_path=str(tmp_path / "missing.safetensors")))


def test_patch_discriminator_shapes_and_batch_independence():
    torch.manual_seed(0)
    disc = PatchDiscriminator(PatchDiscriminatorConfig(base_channels=8))  # n_layers=3
    x64 = torch.rand(3, 3, 64, 64) * 2 - 1
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc(x64).shape == (3, 1, 6, 6)
    assert PatchDiscriminator(PatchDiscriminatorConfig(base_channels=8, n_layers=2))(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    # GroupNorm: a sample's logits do not depend on the rest of its batch (BatchNorm would fail this)
    assert torch.allclose(disc(x64)[1:2], disc(x64[1:2]), atol=1e-6)
    with pytest.raises(ValueError, match="at least 24 px"):
        disc(torch.zeros(1, 3, 16, 16))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())


@pytest.mark.slow  # constructing DDP imports torch._dynamo: seconds on a busy CPU
def test_generator_and_discriminator_steps_with_ddp_wrapped_discriminator(tmp_path):
    """One-process gloo group: a DDP-wrapped discriminator works in both steps; the generator step leaves no grads."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    ddp = None
    try:
        images, latent, weight, disc = _setup()
        ddp = nn.parallel.DistributedDataParallel(disc)
        loss = VQGANLoss(VQGANLossConfig(**ON))
        for step in range(2):
            rec = F.conv2d(latent, weight)
            g = loss.generator_loss(images, rec, quantizer_loss=torch.tensor(0.0), last_layer=weight, step=step, discriminator=ddp)
            g.total.backward()
            assert all(p.grad is None for p in disc.parameters())
            d = loss.discriminator_loss(images, rec, step=step, discriminator=ddp)
            d.total.backward()
            assert all(p.grad is not None for p in disc.parameters())
            disc.zero_grad(set_to_none=True)
    finally:
        # DDP's reducer holds the group: freed after destroy_process_group, the group's destructor can hang joining its
        # gloo threads (seen once in a CI run), so the wrapper goes first
        del ddp
        dist.destroy_process_group()
