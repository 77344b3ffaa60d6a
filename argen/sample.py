"""Sampling image tokens from the GPT: CFG (one function), temperature, top-k, top-p, KV-cached and seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from argen.model.gpt import GPT, KVCache

Generators = torch.Generator | Sequence[torch.Generator] | None


# Bounds on the sampler's settings: outside them the result is greedy or overflows in all but name.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0
MAX_CFG_SCALE = 1000.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and numpy's SeedSequence take non-negative 64-bit seeds
DECODINGS = ("token", "jacobi", "spatial", "zipar")
MAX_WINDOW = 256
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")  # what a pipeline's sampling copy computes in: Pipeline.sampling_precision


class NonFiniteSamplingError(ValueError):
    """The model or the settings produced NaN token probabilities; no image is made from them."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each image token.

    temperature: logits are divided by it; 0 means greedy (argmax, no randomness).
    top_k: keep the k most likely codes (ties at the k-th logit are kept too); None keeps all.
    top_p: nucleus, keep the smallest set of most likely codes whose probability reaches top_p (at least one);
        None or 1.0 keeps all. Applied after top_k.
    cfg_scale: classifier-free guidance scale s in uncond + s * (cond - uncond); 1 is the conditional model
        alone and skips the unconditional rows.
    cfg_schedule: "constant" uses cfg_scale at every token; "linear" ramps the scale from 1 at the first image
        token to cfg_scale at the last (s_t = 1 + (cfg_scale - 1) * t / (N - 1)), so the coarse early tokens
        are guided less.
    decoding: "token" runs one forward pass per image token. "jacobi" and "spatial" are speculative Jacobi
        decoding (argen.speculative): each forward checks a window of draft tokens and keeps what passes the
        speculative-sampling test, so they draw from exactly the same distribution as "token" (the same tokens
        when greedy) with fewer forward passes. "jacobi" starts new drafts uniform, "spatial" as the code above.
        "zipar" decodes several grid rows per forward pass (argen.zipar): approximate, since a token does not see
        the part of the row above that is not decoded yet.
    window: draft tokens checked per forward pass and row by "jacobi" and "spatial" (at most the image's tokens);
        for "zipar", how many tokens a grid row runs ahead of the row below (the grid's width or more is exact).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0
    cfg_schedule: Literal["constant", "linear"] = "constant"
    decoding: Literal["token", "jacobi", "spatial", "zipar"] = "token"
    window: int = 16

    def __post_init__(self) -> None:
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}.")
        if not 0 <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ValueError(f"cfg_scale must be in [0, {MAX_CFG_SCALE:g}] (1 = no guidance), got {self.cfg_scale}.")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {self.cfg_schedule!r}.")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(map(repr, DECODINGS))}, got {self.decoding!r}.")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be in [1, {MAX_WINDOW}], got {self.window}.")

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional rows are needed at all."""
        return self.cfg_scale != 1.0

    def scale_at(self, step: int, num_steps: int) -> float:
        """The guidance scale for image token `step` of `num_steps`."""
        if self.cfg_schedule == "constant" or num_steps == 1:
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * step / (num_steps - 1)


def classifier_free_guidance(outputs: torch.Tensor, scale: float) -> torch.Tensor:
    """THE classifier-free guidance combination (Ho & Salimans 2022): uncond + scale * (cond - uncond), used by the
    GPT sampler on logits and by the unCLIP diffusion samplers on model predictions.

    outputs: (2B, ...) in the batch order [cond; uncond] (rows 0..B-1 conditional, B..2B-1 unconditional).
    Returns (B, ...). scale 1 gives the conditional outputs, 0 the unconditional ones.
    """
    if outputs.shape[0] % 2:
        raise ValueError(f"classifier_free_guidance needs an even batch [cond; uncond], got {outputs.shape[0]} rows.")
    cond, uncond = outputs.chunk(2, dim=0)
    return torch.lerp(uncond, cond, scale)  # uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits (B, V) outside the top-k (the k that `torch.topk` returns, so a tie at the k-th logit
    keeps k) and outside the top-p nucleus; at least one survives per row."""
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely codes
        drop_sorted = mass_before >= top_p  # the first code has mass_before 0 < top_p, so it always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_code_logits(logits: torch.Tensor, t: torch.Tensor, *, image_offset: int, num_codes: int, scales: torch.Tensor,
                       banned: torch.Tensor | None) -> torch.Tensor:
    """The image-code logits (B, T, K) of the parallel decoders, from a forward's logits (R, T, V) whose slot (b, j)
    predicts image token t[b, j] (t: int64 (B, T)): sliced to the codes, guided by each token's scale (N,) where the
    rows are [cond; uncond], and -inf on the codes `banned` (N, K) or (B, N, K) bans at that token."""
    B = t.shape[0]
    logits = logits[..., image_offset : image_offset + num_codes].float()
    if logits.shape[0] > B:
        logits = classifier_free_guidance(logits, scales[t].unsqueeze(-1))
    if banned is not None:
        rows = torch.arange(B, device=t.device)[:, None]
        logits = logits.masked_fill(banned[t] if banned.ndim == 2 else banned[rows, t], float("-inf"))
    return logits


def code_probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities (B, T, K) from code logits (B, T, K) after temperature, top-k and top-p (temperature > 0)."""
    B, T, K = logits.shape
    p = filter_logits((logits / config.temperature).flatten(0, 1), top_k=config.top_k, top_p=config.top_p)
    return torch.softmax(p, dim=-1).view(B, T, K)


class RowNoise:
    """Uniform noise and categorical draws from one generator for the batch, or one per row: with one per row, a
    row's draws do not depend on the rest of the batch.

    A categorical draw takes one uniform and inverts the cumulative sum (not K exponentials or Gumbels per draw,
    which cost more than a small GPT's forward pass at a 4096-code vocabulary)."""

    def __init__(self, generator: Generators, batch_size: int) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for {batch_size} prompts; pass one per prompt or a single one.")
        self.generator, self.batch_size = generator, batch_size

    def subset(self, rows: list[int]) -> RowNoise:
        """The noise of these rows only (a single generator stays shared)."""
        if isinstance(self.generator, list):
            return RowNoise([self.generator[r] for r in rows], len(rows))
        return RowNoise(self.generator, len(rows))

    def _fill(self, out: torch.Tensor, draw) -> torch.Tensor:
        if isinstance(self.generator, list):
            for row, gen in zip(out, self.generator):
                draw(row, gen)
        else:
            draw(out, self.generator)
        return out

    def uniform(self, *shape: int, device: torch.device) -> torch.Tensor:
        """(B, *shape) float32 in [0, 1)."""
        return self._fill(torch.empty(self.batch_size, *shape, device=device), lambda t, g: t.uniform_(generator=g))

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One draw from each distribution in probs (B, ..., K), non-negative and not necessarily normalised ->
        int64 (B, ...): the number of cumulative sums at or below u * total, which is the first code whose
        cumulative sum exceeds it and so has positive probability (u is kept below 1 after rounding)."""
        cdf = probs.float().cumsum(dim=-1)  # (B, ..., K), non-decreasing: a code of probability 0 repeats its left sum
        total = cdf[..., -1:]
        u = self.uniform(*probs.shape[1:-1], 1, device=probs.device)
        v = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
        return (cdf <= v).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)


class TokenPicker:
    """Draws one token per row from logits (B, V) with a SamplingConfig (see RowNoise for the draws).

    With top-k only the k candidates' probabilities are formed and drawn from."""

    def __init__(self, config: SamplingConfig, *, batch_size: int, vocab: int, device: torch.device,
                 generator: Generators = None):
        self.config = config
        self.rng = RowNoise(generator, batch_size)
        self.top_k = config.top_k if config.top_k is not None and config.top_k < vocab else None
        # (B,) rows that met NaN logits or probabilities at any step; read once at the end (no per-step device sync)
        self.nonfinite = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> int64 (B,) in [0, V)."""
        cfg = self.config
        if cfg.temperature == 0:
            self.nonfinite |= logits.isnan().any(dim=-1)
            return logits.argmax(dim=-1)
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        candidates = None
        if self.top_k is not None:  # the top-k filter of filter_logits, as (B, k) logits and their codes
            logits, candidates = logits.topk(self.top_k, dim=-1)
        probs = torch.softmax(filter_logits(logits, top_p=cfg.top_p).float(), dim=-1)
        self.nonfinite |= probs.isnan().any(dim=-1)
        pick = self.rng.categorical(probs)
        return pick if candidates is None else candidates.gather(-1, pick[:, None])[:, 0]


@dataclass
class Decoded:
    """Image codes and what they cost."""

    codes: torch.Tensor      # (B, N) int64 in [0, num_codes)
    forward_passes: int      # model calls, the prefill included
    nonfinite: torch.Tensor  # (B,) bool: rows that met NaN logits or probabilities


def sample_image_tokens(model: GPT, prefix: torch.Tensor, **kwargs) -> torch.Tensor:
    """The codes (B, h*w) of `decode_image_tokens` (same arguments)."""
    return decode_image_tokens(model, prefix, **kwargs).codes


def decode_image_tokens(
    model: GPT,
    prefix: torch.Tensor,
    *,
    image_offset: int,
    num_codes: int,
    uncond_prefix: torch.Tensor | None = None,
    config: SamplingConfig = SamplingConfig(),
    generator: Generators = None,
    use_cache: bool = True,
    allowed_codes: torch.Tensor | None = None,
    cache_dtype: torch.dtype | None = None,
) -> Decoded:
    """Sample h*w image codes for each prompt prefix; returns them with the number of forward passes.

    prefix: int64 (B, prefix_len), text ids then BOI. uncond_prefix: int64 (prefix_len,), the empty-caption
    prefix, required when config.cfg_scale != 1; the model then runs [cond; uncond] as one batch of 2B rows
    and `classifier_free_guidance` combines them. Only the logits of the image codes, vocabulary ids
    [image_offset, image_offset + num_codes), are sampled. Returns int64 (B, h*w) codes in [0, num_codes).

    With use_cache (the default) the prefix is prefilled into a KVCache allocated once, then each image
    token is one forward of T=1. use_cache=False recomputes the whole sequence every step (quadratic; for
    measuring the cache only). generator: one torch.Generator for the batch, or one per prompt so that a
    prompt's tokens are the same in any batch; None uses the global RNG. Runs under torch.inference_mode
    with the model in eval mode (its train/eval mode is restored afterwards). On an x86 CPU, pass
    `argen.model.pack_for_cpu(model)` (made once) for faster sampling (docs/speed.md). cache_dtype: the KV cache's
    dtype (default: the model's `kv_cache_dtype`, else its weights'); torch.bfloat16 under a float32 model halves the
    cache's memory traffic, the largest cost of batched CPU decoding besides the weights, at the price of
    bf16-rounded keys and values.

    allowed_codes: optional bool (h*w, num_codes), or (B, h*w, num_codes) per prompt: image position t draws only
    among the codes allowed at t (after CFG, before temperature/top-k/top-p); each position must allow at least
    one code, and one allowed code forces it. The AR prior uses it to give its text-embedding tokens and to draw
    its dot-product token from the top half of the buckets.

    config.decoding "jacobi" or "spatial" decodes several tokens per forward pass (argen.speculative), from the
    same distribution; "zipar" several grid rows per pass (argen.zipar), approximately. They need the cache. NaN logits or probabilities raise NonFiniteSamplingError.
    """
    cfg = model.config
    if prefix.ndim != 2 or prefix.shape[1] != cfg.prefix_len or prefix.dtype != torch.long:
        raise ValueError(
            f"prefix must be int64 (B, prefix_len={cfg.prefix_len}), got {prefix.dtype} {tuple(prefix.shape)}."
        )
    if image_offset < 0 or num_codes < 1 or image_offset + num_codes > cfg.vocab_size:
        raise ValueError(
            f"image codes [image_offset, image_offset + num_codes) = [{image_offset}, {image_offset + num_codes}) "
            f"must lie inside the model's vocab_size={cfg.vocab_size}."
        )
    B, P, N = prefix.shape[0], cfg.prefix_len, cfg.num_image_tokens
    if allowed_codes is not None:
        if allowed_codes.shape not in ((N, num_codes), (B, N, num_codes)) or allowed_codes.dtype != torch.bool:
            raise ValueError(f"allowed_codes must be bool (h*w, num_codes) = ({N}, {num_codes}) or (B, h*w, num_codes) "
                             f"= ({B}, {N}, {num_codes}), got {allowed_codes.dtype} {tuple(allowed_codes.shape)}.")
        if not allowed_codes.any(dim=-1).all():
            empty = (~allowed_codes.any(dim=-1)).nonzero().tolist()
            raise ValueError(f"allowed_codes allows no code at {'(prompt, position)' if allowed_codes.ndim == 3 else 'positions'} "
                             f"{empty[:8]}; allow at least one per position.")
        banned = ~allowed_codes.to(prefix.device)  # (N, K) or (B, N, K)
    rows = prefix
    if config.uses_cfg:
        if uncond_prefix is None:
            raise ValueError(f"cfg_scale={config.cfg_scale} needs uncond_prefix (the empty-caption prefix, shape ({P},)).")
        if uncond_prefix.shape != (P,) or uncond_prefix.dtype != torch.long:
            raise ValueError(f"uncond_prefix must be int64 ({P},), got {uncond_prefix.dtype} {tuple(uncond_prefix.shape)}.")
        rows = torch.cat([prefix, uncond_prefix.to(prefix.device).expand(B, P)])  # (2B, P): [cond; uncond]
    R = rows.shape[0]
    device = prefix.device
    cache_dtype = cache_dtype or model.kv_cache_dtype or next(model.parameters()).dtype
    if config.decoding != "token":
        if not use_cache:
            raise ValueError(f"decoding={config.decoding!r} writes drafts into the KV cache; it needs use_cache=True.")
        from argen.speculative import SpeculativeDecoder
        from argen.zipar import RowParallelDecoder

        decoder = RowParallelDecoder if config.decoding == "zipar" else SpeculativeDecoder
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                decoded = decoder(
                    model, rows, batch_size=B, image_offset=image_offset, num_codes=num_codes, config=config,
                    banned=banned if allowed_codes is not None else None, noise=RowNoise(generator, B),
                    cache_dtype=cache_dtype).run()
        finally:
            model.train(was_training)
        return _checked(decoded, config)
    pick = TokenPicker(config, batch_size=B, vocab=num_codes, device=device, generator=generator)
    scales = [config.scale_at(t, N) for t in range(N)]
    codes_slice = slice(image_offset, image_offset + num_codes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            codes = torch.empty(B, N, dtype=torch.long, device=device)  # (B, N)
            if use_cache:
                cache = KVCache.allocate(cfg, R, device=device, dtype=cache_dtype)
                logits = model(rows, cache=cache, start=0, logits_from=P - 1)[:, -1, codes_slice]  # (R, K)
                step_input = torch.empty(R, 1, dtype=torch.long, device=device)  # (R, 1), reused every step
            else:
                seq = torch.empty(R, cfg.block_size, dtype=torch.long, device=device)  # (R, P + N - 1)
                seq[:, :P] = rows
                logits = model(rows, logits_from=P - 1)[:, -1, codes_slice]
            for t in range(N):
                if config.uses_cfg:
                    logits = classifier_free_guidance(logits, scales[t])  # (B, K)
                if allowed_codes is not None:
                    logits = logits.masked_fill(banned[..., t, :], float("-inf"))
                code = pick(logits)  # (B,)
                codes[:, t] = code
                if t == N - 1:
                    break
                token = (code + image_offset).view(B, 1)
                if use_cache:
                    step_input[:B] = token
                    if R > B:
                        step_input[B:] = token  # the uncond rows continue with the same image tokens
                    logits = model(step_input, cache=cache, start=P + t)[:, -1, codes_slice]
                else:
                    seq[:B, P + t : P + t + 1] = token
                    if R > B:
                        seq[B:, P + t : P + t + 1] = token
                    logits = model(seq[:, : P + t + 1], logits_from=P + t)[:, -1, codes_slice]
    finally:
        model.train(was_training)
    return _checked(Decoded(codes=codes, forward_passes=N, nonfinite=pick.nonfinite), config)


def _checked(decoded: Decoded, config: SamplingConfig) -> Decoded:
    """`decoded`, or NonFiniteSamplingError when a row met NaN logits or probabilities."""
    if decoded.nonfinite.any():
        bad = decoded.nonfinite.nonzero().flatten().tolist()
        raise NonFiniteSamplingError(
            f"NaN token probabilities in {len(bad)} of {len(decoded.nonfinite)} rows (first: {bad[:8]}) with {config}: "
            "the model produced non-finite logits, or the guidance scale overflowed them. No image was made; check the "
            "weights (a NaN in training?) or lower cfg_scale.")
    return decoded
