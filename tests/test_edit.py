"""Token-space editing and reranking on the tiny pipeline: masks snapped to the code grid, kept tokens and pixels kept,
the teacher-forced scores aligned with the sampler, Gibbs' conditional against brute force, seeded rows that do not
depend on their batch, boundary errors that name the problem, and `argen edit` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_decoder import clip  # noqa: F401  (module-scoped tiny CLIP, untrained)
from test_gpt_task import CAPTIONS
from test_pipeline import trained  # noqa: F401  (module-scoped: a tiny GPT trained through argen train gpt)

from argen import edit
from argen.cli import main
from argen.pipeline import Pipeline
from argen.rerank import best_of, rerank
from argen.sample import SamplingConfig, decode_image_tokens

GREEDY_CFG = SamplingConfig(temperature=0, cfg_scale=2.0)
SAMPLED = SamplingConfig(temperature=1.0, cfg_scale=2.0, top_k=8)


@pytest.fixture(scope="module")
def pipe(trained):  # noqa: F811
    return Pipeline.load(trained.final)


@pytest.fixture(scope="module")
def source(pipe):
    """A 16 px image the tiny GPT knows: the decoded codes it sampled for CAPTIONS[0]."""
    codes = pipe.generate(CAPTIONS[0], sampling=SamplingConfig(temperature=0), seed=0).codes
    return pipe.vq.decode(codes).clamp(-1, 1)[0].detach()


def test_masks_snap_outward_to_the_code_grid():
    # 16 px, 4x4 codes of 4x4 px: a box inside one code takes that code; one across a corner takes four
    one = edit.GridMask.snap(edit.mask_pixels(box=(1, 1, 3, 3), resolution=16), grid=4)
    assert one.cells[0].nonzero().tolist() == [[0, 0]] and int(one.pixels.sum()) == 16
    four = edit.GridMask.snap(edit.mask_pixels(box=(3, 3, 5, 5), resolution=16), grid=4)
    assert four.cells[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert (four.pixels & four.requested).sum() == four.requested.sum()  # the cells cover the region given
    assert four.as_dict()["pixels_added_by_snapping"] == 64 - 4
    assert "regenerating 4 of 16 codes" in four.describe()
    # a fractional box edge takes the pixel it cuts; a mask image reads white as "regenerate"
    assert edit.mask_pixels(box=(0.5, 0, 1.5, 1), resolution=16).sum() == 2
    array = np.zeros((16, 16), np.uint8)
    array[8:, 12:] = 255
    from_image = edit.mask_pixels(mask=Image.fromarray(array), resolution=16)
    assert torch.equal(from_image, edit.mask_pixels(box=(12, 8, 16, 16), resolution=16))
    assert torch.equal(from_image, edit.mask_pixels(mask=array > 0, resolution=16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask=np.ones((8, 8), bool)), r"the mask is \(8, 8\), but the image is \(16, 16\)"),
    (dict(box=(10, 2, 20, 6)), r"box .* must satisfy 0 <= x0 < x1 <= 16"),
    (dict(box=(4, 4, 4, 8)), r"must satisfy 0 <= x0 < x1"),
    (dict(box=(1, 2, 3)), r"a box is \(x0, y0, x1, y1\), got 3 numbers"),
    (dict(), "give exactly one of a mask"),
    (dict(mask=np.ones((16, 16), bool), box=(0, 0, 4, 4)), "give exactly one of a mask"),
])
def test_bad_masks_and_boxes_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        edit.mask_pixels(resolution=16, **kwargs)


def test_bad_inputs_to_an_edit_are_named(pipe, source):
    with pytest.raises(ValueError, match="the mask is empty"):
        edit.inpaint(pipe, source, CAPTIONS[0], mask=np.zeros((16, 16), bool))
    with pytest.raises(ValueError, match=r"the image is 32x32 px, but this tokenizer reads 16x16"):
        edit.inpaint(pipe, torch.zeros(3, 32, 32), CAPTIONS[0], box=(0, 0, 4, 4))
    with pytest.raises(ValueError, match="keep_rows must be in"):
        edit.complete(pipe, source, CAPTIONS[0], keep_rows=16)
    with pytest.raises(ValueError, match="nothing to outpaint"):
        edit.outpaint(pipe, source, CAPTIONS[0], keep_box=(0, 0, 16, 16))
    with pytest.raises(ValueError, match="edit method must be one of"):
        edit.EditConfig(method="diffuse")
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        edit.edit_images(pipe, source, torch.ones(16, 16, dtype=torch.bool), ["a", "b"])


def test_teacher_forced_scores_line_up_with_the_sampler(pipe):
    """Greedy CFG sampling takes the argmax of p(x_t | x_<t) at every t: the scores must say the same."""
    layout = pipe.layout
    prefix = layout.prefix(pipe.text.encode(list(CAPTIONS), text_len=layout.text_len))
    uncond = layout.uncond_prefix()
    codes = decode_image_tokens(pipe.gpt, prefix, image_offset=layout.image_offset, num_codes=layout.num_codes,
                                uncond_prefix=uncond, config=GREEDY_CFG).codes
    lp = edit.token_log_probs(pipe.gpt, prefix, codes, image_offset=layout.image_offset, num_codes=layout.num_codes,
                              sampling=GREEDY_CFG, uncond_prefix=uncond)
    assert lp.shape == (4, 16, layout.num_codes)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(4, 16), atol=1e-5)
    assert torch.equal(lp.argmax(-1), codes)


@pytest.mark.parametrize("method", edit.EDIT_METHODS)
def test_kept_tokens_and_pixels_stay_and_rows_are_seeded(pipe, source, method):
    config = edit.EditConfig(method=method, proposals=3, passes=1, candidates=4)
    r = edit.inpaint(pipe, source, CAPTIONS[1], box=(4, 4, 12, 8), n=3, sampling=SAMPLED, config=config, seed=5)
    assert r.images.shape == (3, 3, 16, 16) and r.codes.shape == (3, 16) and len(r.pil()) == 3
    keep = ~r.mask.cells[0].flatten()
    source_codes = pipe.vq.encode(source[None]).flatten(1)
    assert torch.equal(r.codes[:, keep], source_codes.expand(3, -1)[:, keep])  # every kept token kept exactly
    outside = ~r.mask.pixels[0]
    assert torch.equal(r.images[:, :, outside], source[None].expand(3, -1, -1, -1)[:, :, outside])  # pasted back
    inside = r.mask.pixels[0]
    assert torch.equal(r.images[:, :, inside], r.decoded[:, :, inside])
    assert torch.isfinite(r.suffix_nll).all() and r.recon_psnr_outside.shape == (1,)
    again = edit.inpaint(pipe, source, CAPTIONS[1], box=(4, 4, 12, 8), n=3, sampling=SAMPLED, config=config, seed=5)
    assert torch.equal(again.codes, r.codes)
    # the same image in a batch with another, in batches of one row: the same rows
    batch = edit.edit_images(pipe, [source, -source], edit.mask_pixels(box=(4, 4, 12, 8), resolution=16),
                             [CAPTIONS[1], CAPTIONS[2]], n=3, sampling=SAMPLED, config=config, seed=5, batch_size=1)
    assert torch.equal(batch.codes[:3], r.codes) and batch.source_index == [0, 0, 0, 1, 1, 1]


def test_no_paste_keeps_the_decoded_codes_and_reports_their_psnr(pipe, source):
    r = edit.inpaint(pipe, source, CAPTIONS[1], box=(0, 0, 4, 4), n=2, sampling=SAMPLED,
                     config=edit.EditConfig(method="ar", paste=False), seed=0)
    assert torch.equal(r.images, r.decoded)
    assert r.psnr_outside.shape == (2,) and float(r.psnr_outside.min()) > 0


def test_gibbs_draws_each_token_from_its_full_conditional(pipe, source):
    """At temperature 0 with every code a candidate, one pass over one token picks argmax_c p(x with x_i = c): the
    joint, brute-forced here with one teacher-forced score per value."""
    layout, K = pipe.layout, pipe.layout.num_codes
    sampling = SamplingConfig(temperature=0, cfg_scale=2.0)
    r = edit.inpaint(pipe, source, CAPTIONS[2], box=(4, 4, 8, 8), n=1, sampling=sampling,
                     config=edit.EditConfig(method="gibbs", passes=1, candidates=K), seed=0)
    i = int(r.mask.cells[0].flatten().nonzero())
    trial = r.codes.repeat(K, 1)
    trial[:, i] = torch.arange(K)
    prefix = layout.prefix(pipe.text.encode([CAPTIONS[2]] * K, text_len=layout.text_len))
    lp = edit.token_log_probs(pipe.gpt, prefix, trial, image_offset=layout.image_offset, num_codes=K,
                              sampling=sampling, uncond_prefix=layout.uncond_prefix())
    joint = lp.gather(-1, trial[..., None])[..., 0].sum(dim=1)  # (K,)
    assert int(joint.argmax()) == int(r.codes[0, i])


def test_completion_and_outpainting_regenerate_the_rest(pipe, source):
    done = edit.complete(pipe, source, CAPTIONS[0], keep_rows=6, n=2, sampling=SAMPLED,
                         config=edit.EditConfig(method="ar"))
    assert done.mask.cells[0].any(dim=1).tolist() == [False, True, True, True]  # a partly kept code row is redrawn
    assert torch.isnan(done.suffix_nll).all()  # nothing kept follows the region
    out = edit.outpaint(pipe, source, CAPTIONS[0], keep_box=(4, 4, 12, 12), n=1, sampling=SAMPLED)
    assert out.mask.cells[0].flatten().tolist() == [True] * 5 + [False] * 2 + [True] * 2 + [False] * 2 + [True] * 5


def test_pipeline_methods_return_pil_images(pipe, source):
    images = pipe.inpaint(edit.image_batch(source, resolution=16)[0], CAPTIONS[1], box=(0, 0, 8, 8), n=2,
                          sampling=SAMPLED)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    assert len(pipe.complete(source, CAPTIONS[1], keep_rows=8, n=1)) == 1
    assert len(pipe.outpaint(source, CAPTIONS[1], keep_box=(0, 0, 8, 16), n=1)) == 1


def test_rerank_keeps_the_best_scored_draw(pipe, clip):  # noqa: F811
    r = rerank(pipe, CAPTIONS[:2], clip=clip, n=4, sampling=SAMPLED, seed=0)
    assert r.scores.shape == (2, 4) and torch.equal(r.best, r.scores.argmax(dim=1))
    assert torch.equal(r.images, r.draws.images[torch.tensor([0, 4]) + r.best])
    assert torch.equal(best_of(r.scores, 1), torch.zeros(2, dtype=torch.long))
    fewer = rerank(pipe, CAPTIONS[:2], clip=clip, n=2, sampling=SAMPLED, seed=0)  # draw k does not depend on n
    assert torch.equal(fewer.draws.images, r.draws.images.view(2, 4, 3, 16, 16)[:, :2].flatten(0, 1))
    assert torch.equal(fewer.best, best_of(r.scores, 2))
    with pytest.raises(ValueError, match="every prompt must be non-empty"):
        rerank(pipe, [""], clip=clip, n=2)
    assert len(pipe.rerank(CAPTIONS[0], clip=clip, n=2)) == 1


def test_edit_cli_writes_grid_images_and_record(trained, source, tmp_path, capsys):  # noqa: F811
    from argen.data.transforms import tensor_to_pil

    tensor_to_pil(source).save(tmp_path / "src.png")
    out = tmp_path / "inpaint.png"
    args = ["edit", "inpaint", "--pipeline", str(trained.final), "--image", str(tmp_path / "src.png"), "--box", "1,1,7,7",
            CAPTIONS[1], "-n", "2", "--method", "resample", "--proposals", "2", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "regenerating 4 of 16 codes" in printed and "tokenizer's own reconstruction" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["masks"][0]["codes_regenerated"] == 4 and record["edit"]["method"] == "resample"
    assert len(list((tmp_path / "inpaint_images").glob("*.png"))) == 2 and out.is_file()
    assert main(args) == 0  # its own outputs are replaced
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    bad = ["edit", "complete", "--pipeline", str(trained.final), "--image", str(tmp_path / "big.png"), "--keep-rows", "8",
           CAPTIONS[0], "-o", str(tmp_path / "c.png")]
    assert main(bad) == 2
    assert "is 32x32 px, but the pipeline reads 16x16; pass --resize" in capsys.readouterr().err
    assert main(bad + ["--resize"]) == 0
    with pytest.raises(SystemExit):
        main(["edit", "inpaint", "--pipeline", str(trained.final), "--image", "x.png", "--box", "1,2,3", "a"])
    assert "a box is x0,y0,x1,y1 (four numbers)" in capsys.readouterr().err
