"""unCLIP controls on a tiny untrained CLIP and decoder: slerp, the embeddings each control decodes, shared noise along
a path, SDEdit's noise levels, seeded rows, boundary errors naming the problem, and the `argen edit` commands on a
tiny trained stack (slow)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_compare import stack  # noqa: F401  (module-scoped tiny unCLIP stack, built only for the slow test)
from test_decoder import clip, tiny_decoder  # noqa: F401  (module-scoped tiny CLIP)

from argen.unclip import controls
from argen.unclip.pipeline import DecoderSampling, UnclipPipeline, UnclipSampling

FAST = DecoderSampling(steps=3, cfg_scale=2.0)


@pytest.fixture(scope="module")
def upipe(clip):  # noqa: F811
    """A pipeline with no prior ("none": the decoder reads the caption's text embedding)."""
    return UnclipPipeline(clip=clip, decoder=tiny_decoder())


def image(seed: int) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_slerp_stays_on_the_sphere_between_its_ends():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    path = controls.slerp(a, b, [0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.allclose(path.norm(dim=-1), torch.ones(4), atol=1e-6)
    angle = torch.arccos((path @ a).clamp(-1, 1))  # equal steps in angle: 0, theta / 4, theta / 2, theta
    assert torch.allclose(angle[1] * 2, angle[2], atol=1e-5) and torch.allclose(angle[2] * 2, angle[3], atol=1e-5)
    assert torch.allclose(controls.slerp(a, a, [0.3])[0], a, atol=1e-6)  # parallel ends


def test_variations_decode_the_image_embedding_with_their_own_noise(upipe):
    r = controls.variations(upipe, image(0), n=3, seed=1, decoder=FAST)
    assert r.images.shape == (3, 3, 32, 32) and r.images.abs().max() <= 1 and len(r.pil()) == 3
    z = controls.image_embedding(upipe, image(0))
    assert torch.allclose(r.embeds, z.expand(3, -1), atol=1e-6)
    assert len(set(r.seeds)) == 3 and not torch.equal(r.images[0], r.images[1])
    again = controls.variations(upipe, image(0), n=3, seed=1, decoder=FAST)
    assert torch.equal(again.images, r.images)
    # row k does not depend on n (it has its own generator); the batch changes float rounding, which this untrained
    # decoder's CFG and thresholding amplify to ~1e-2 in a few pixels (as in test_compare)
    assert (controls.variations(upipe, image(0), n=1, seed=1, decoder=FAST).images[0] - r.images[0]).abs().max() < 0.05
    images = upipe.variations(Image.fromarray((((image(0) + 1) * 127.5).round().byte().permute(1, 2, 0)).numpy()), n=2,
                              decoder=FAST)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_interpolation_and_text_diff_share_one_noise_along_the_path(upipe):
    r = controls.interpolate(upipe, image(0), image(1), steps=4, seed=0, decoder=FAST)
    za, zb = controls.image_embedding(upipe, torch.stack([image(0), image(1)]))
    assert torch.allclose(r.embeds[0], za, atol=1e-5) and torch.allclose(r.embeds[-1], zb, atol=1e-5)
    assert r.values == [0.0, 1 / 3, 2 / 3, 1.0] and len(set(r.seeds)) == 1
    ends = controls.decode_embeddings(upipe, torch.stack([za, zb]), seeds=r.seeds[:2], decoder=FAST)
    assert (ends - r.images[[0, -1]]).abs().max() < 0.05  # each end is its image's own decoding, same noise
    d = controls.text_diff(upipe, image(0), "a red circle", "a blue circle", steps=3, max_angle=0.5, decoder=FAST)
    assert d.values == [0.0, 0.25, 0.5] and torch.allclose(d.embeds[0], za, atol=1e-5)
    t = F.normalize(upipe.clip.encode_text(["a red circle", "a blue circle"]).embeds, dim=-1)
    z_d = F.normalize(t[1] - t[0], dim=-1)
    assert (d.embeds @ z_d).diff().min() > 0  # moving towards the diff
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        controls.text_diff(upipe, image(0), "a red circle", "a red circle")
    with pytest.raises(ValueError, match="target_caption must be a non-empty caption"):
        controls.text_diff(upipe, image(0), "a red circle", " ")


def test_sdedit_noise_levels(upipe):
    src = image(2)
    kept = controls.sdedit(upipe, src, "a red circle", strength=0.0, n=2, sampling=UnclipSampling(prior="none", decoder=FAST))
    assert torch.equal(kept.images, src.clamp(-1, 1).expand(2, -1, -1, -1))  # strength 0: the image itself
    sampling = UnclipSampling(prior="none", decoder=DecoderSampling(steps=10, cfg_scale=2.0))
    low = controls.sdedit(upipe, src, "a red circle", strength=0.2, n=2, sampling=sampling)
    high = controls.sdedit(upipe, src, "a red circle", strength=1.0, n=2, sampling=sampling)
    assert low.images.shape == (2, 3, 32, 32)
    # a little noise keeps the source close; all of it forgets it
    assert (low.images - src).pow(2).mean() < (high.images - src).pow(2).mean()
    again = controls.sdedit(upipe, src, "a red circle", strength=0.2, n=2, sampling=sampling)
    assert torch.equal(again.images, low.images)
    for sampler in ("ddim", "ddpm"):
        s = UnclipSampling(prior="none", decoder=DecoderSampling(sampler=sampler, steps=4, cfg_scale=2.0))
        assert torch.isfinite(controls.sdedit(upipe, src, "a red circle", strength=0.5, n=1, sampling=s).images).all()


@pytest.mark.parametrize("call, match", [
    (lambda p: controls.sdedit(p, image(0), "a red circle", strength=1.5), r"noise level \(strength\) must be in \[0, 1\]"),
    (lambda p: controls.sdedit(p, image(0), "a red circle", strength=-0.1), r"must be in \[0, 1\]"),
    (lambda p: controls.sdedit(p, image(0), "", strength=0.5), "give a non-empty one"),
    (lambda p: controls.variations(p, torch.zeros(3, 16, 16)), r"the image is 16x16 px, but this tokenizer reads 32x32"),
    (lambda p: controls.variations(p, image(0), n=0), r"n must be in \[1,"),
    (lambda p: controls.interpolate(p, image(0), image(1), steps=1), r"steps .* must be in \[2,"),
    (lambda p: controls.text_diff(p, image(0), "a red circle", "a blue circle", max_angle=2.0), r"max_angle must be in"),
    (lambda p: controls.variations(p, "not an image"), "an image must be a PIL image"),
])
def test_bad_inputs_are_named(upipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(upipe)


@pytest.mark.slow
def test_edit_cli_unclip_commands(stack, tmp_path, capsys):  # noqa: F811
    """Each unCLIP command end to end on test_compare's tiny stack, trained through `argen train`."""
    from argen.cli import main
    from argen.data.transforms import tensor_to_pil

    for i in range(2):
        tensor_to_pil(image(i)).save(tmp_path / f"{i}.png")
    base = ["--unclip", str(stack["pipe"]), "--decoder-steps", "2"]
    runs = {"variations": ["--image", str(tmp_path / "0.png"), "-n", "2"],
            "interpolate": ["--image", str(tmp_path / "0.png"), "--to-image", str(tmp_path / "1.png"), "--steps", "3"],
            "text-diff": ["--image", str(tmp_path / "0.png"), "--from", "a red circle", "--to", "a blue circle"],
            "sdedit": ["--image", str(tmp_path / "0.png"), "a red square", "--strength", "0.5", "-n", "2"]}
    for cmd, extra in runs.items():
        out = tmp_path / f"{cmd}.png"
        assert main(["edit", cmd, *base, *extra, "-o", str(out)]) == 0, capsys.readouterr().err
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["command"] == f"edit {cmd}" and out.is_file()
        assert len(list((tmp_path / f"{cmd}_images").glob("*.png"))) == len(record["values"])
    with pytest.raises(SystemExit):
        main(["edit", "sdedit", *base, "--image", str(tmp_path / "0.png"), "x", "--strength", "2", "-o", str(tmp_path / "b.png")])
    assert "must be a number in [0, 1], got 2" in capsys.readouterr().err
