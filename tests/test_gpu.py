"""CUDA checks: every attention backend equals `math` (xformers under bf16 autocast too), greedy sampling on the GPU
gives the same tokens with and without parallel decoding, bf16 sampling stays close to float32, and a bf16 training
step learns. Run with -m gpu."""

from __future__ import annotations

import pytest
import torch
from test_sample import NUM_CODES, OFFSET, UNCOND, prompts, tiny_model

from argen.model import bf16_blocks
from argen.model.attention import attention, available_backends
from argen.sample import SamplingConfig, decode_image_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("causal", [True, False])
def test_every_cuda_backend_equals_math(causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 40, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 2, 40, 64, device="cuda", generator=g) for _ in range(2))
    want = attention(q, k, v, backend="math", causal=causal)
    for backend in available_backends("cuda"):
        torch.testing.assert_close(attention(q, k, v, backend=backend, causal=causal), want, atol=2e-3, rtol=2e-3)


def test_backends_under_bf16_autocast_take_fp32_queries_and_bf16_values():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 8, 40, 64, device="cuda", generator=g) for _ in range(2))
    v = torch.randn(2, 8, 40, 64, device="cuda", generator=g).bfloat16()  # as the GPT's linear gives it under autocast
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = attention(q, k, v.float(), backend="math")
        for backend in available_backends("cuda"):
            out = attention(q, k, v, backend=backend)
            assert out.dtype == q.dtype
            torch.testing.assert_close(out.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("decoding", ["token", "jacobi", "spatial", "zipar"])  # zipar: window 4 >= the grid width
def test_greedy_cuda_sampling_is_the_same_with_parallel_decoding(decoding):
    model = tiny_model().cuda()
    prefix = prompts(4).cuda()

    def run(config):
        return decode_image_tokens(model, prefix, image_offset=OFFSET, num_codes=NUM_CODES, uncond_prefix=UNCOND.cuda(),
                                   config=config).codes

    base = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    assert torch.equal(run(SamplingConfig(**{**base.__dict__, "decoding": decoding, "window": 4})), run(base))


def test_bf16_blocks_sample_on_cuda_with_a_bf16_cache_close_to_float32():
    model = tiny_model().cuda()
    fast = bf16_blocks(model)
    prefix = prompts(4).cuda()
    with torch.no_grad():
        torch.testing.assert_close(fast(prefix), model(prefix), atol=2e-2, rtol=2e-2)

    def run(gpt):
        return decode_image_tokens(gpt, prefix, image_offset=OFFSET, num_codes=NUM_CODES, uncond_prefix=UNCOND.cuda(),
                                   config=SamplingConfig(temperature=0.0, cfg_scale=2.0)).codes

    assert fast.kv_cache_dtype == torch.bfloat16 and (run(fast) == run(model)).float().mean() > 0.8


def test_a_bf16_training_step_on_cuda_learns(tmp_path):
    from train_toy_script import ToyData, ToyTask, toy_config

    from argen.train.loop import train

    result = train(ToyTask(), ToyData(), toy_config(tmp_path, max_steps=20, mixed_precision="bf16"),
                   task_config={"toy": 1})
    assert result.step == 20 and all(torch.isfinite(torch.tensor(v)) for v in result.logs.values())
