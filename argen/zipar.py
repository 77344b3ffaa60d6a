"""Row-parallel decoding of image tokens in the style of ZipAR (He et al. 2024, "ZipAR: Accelerating Auto-regressive
Image Generation through Spatial Locality"): a grid row starts once the row above is `window` tokens ahead, so
several rows advance in one forward pass. Approximate: a token does not see the part of the row above that is not
decoded yet, which the model saw in training."""

from __future__ import annotations

import torch

from argen.model.gpt import GPT, KVCache, RowPositions
from argen.sample import Decoded, RowNoise, SamplingConfig, code_probabilities, guided_code_logits


def zipar_schedule(grid: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """When each image token is decoded, and which token feeds its position.

    Token (r, c) of an h x w grid is decoded in pass r * lag + c, lag = min(window, w): row r runs `lag` tokens behind
    row r - 1. Returns (pass_of, source), int64 (h*w,) each. source[i] is the token read at token i's position, whose
    output predicts token i: token i - 1 inside a row; for the first token of row r, the last token of row r - 1 decoded
    by then, (r - 1, lag - 1), which is (r - 1, w - 1) as in plain decoding when lag = w. -1 for token 0 (BOI).
    With lag = w this is one token per pass in raster order."""
    h, w = grid
    lag = min(window, w)
    r, c = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    pass_of = r * lag + c
    source = torch.where(c > 0, r * w + c - 1, (r - 1) * w + lag - 1)
    source[0] = -1
    return pass_of, source


def zipar_visibility(grid: tuple[int, int], window: int) -> torch.Tensor:
    """bool (h*w, h*w): True where image position j (the one that predicts token j) is visible to the query that
    predicts token i: j <= i, and j written in the same pass or before."""
    pass_of, _ = zipar_schedule(grid, window)
    n = len(pass_of)
    return torch.ones(n, n, dtype=torch.bool).tril() & (pass_of[None, :] <= pass_of[:, None])


class RowParallelDecoder:
    """Decodes the image codes of a batch of prefixes, several grid rows per forward pass (see `zipar_schedule`).

    Same arguments as `argen.speculative.SpeculativeDecoder`. Every row of the batch follows the same schedule, so
    one forward pass serves them all; each draws its noise from its own generator, so a row's images do not depend
    on the other rows in its batch."""

    def __init__(self, model: GPT, rows: torch.Tensor, *, batch_size: int, image_offset: int, num_codes: int,
                 config: SamplingConfig, banned: torch.Tensor | None, noise: RowNoise, cache_dtype: torch.dtype) -> None:
        cfg = model.config
        self.model, self.rows, self.config, self.banned, self.noise = model, rows, config, banned, noise
        self.B, self.R, self.P = batch_size, rows.shape[0], rows.shape[1]
        self.N, self.K = cfg.num_image_tokens, num_codes
        self.image_offset = image_offset
        device = rows.device
        pass_of, source = zipar_schedule(cfg.image_grid, config.window)
        self.pass_of, self.source = pass_of.to(device), source.to(device)
        self.visible = zipar_visibility(cfg.image_grid, config.window).to(device)
        self.scales = torch.tensor([config.scale_at(i, self.N) for i in range(self.N)], device=device)  # (N,)
        self.cache = KVCache.allocate(cfg, self.R, device=device, dtype=cache_dtype)
        self.codes = torch.zeros(self.B, self.N, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.forward_passes = 0

    def run(self) -> Decoded:
        logits = self.model(self.rows, cache=self.cache, start=0, logits_from=self.P - 1)  # the prefill predicts token 0
        self.forward_passes += 1
        self._commit(torch.zeros(1, dtype=torch.long, device=self.rows.device), logits)
        for t in range(1, int(self.pass_of.max()) + 1):
            cells = (self.pass_of == t).nonzero().flatten()  # (M,) the tokens this pass predicts, ascending
            inputs = self.codes[:, self.source[cells]] + self.image_offset  # (B, M), decoded in earlier passes
            index = self.P - 1 + cells  # their positions
            end = int(index[-1]) + 1
            mask = torch.ones(len(cells), end, dtype=torch.bool, device=self.rows.device)
            mask[:, self.P - 1 :] = self.visible[cells][:, : end - self.P + 1]
            positions = RowPositions(index=index.expand(self.R, -1), end=end, mask=mask.expand(self.R, 1, -1, -1))
            logits = self.model(inputs.repeat(self.R // self.B, 1), cache=self.cache, start=positions)
            self.forward_passes += 1
            self._commit(cells, logits)
        return Decoded(codes=self.codes, forward_passes=self.forward_passes, nonfinite=self.nonfinite)

    def _commit(self, cells: torch.Tensor, logits: torch.Tensor) -> None:
        """Draw the tokens `cells` (M,) from the model's logits (R, M, V) at their positions."""
        logits = guided_code_logits(logits, cells.expand(self.B, -1), image_offset=self.image_offset, num_codes=self.K,
                                    scales=self.scales, banned=self.banned)  # (B, M, K)
        if self.config.temperature == 0:
            self.nonfinite |= logits.isnan().any(dim=-1).any(dim=-1)
            self.codes[:, cells] = logits.argmax(dim=-1)
            return
        p = code_probabilities(logits, self.config)
        self.nonfinite |= p.isnan().any(dim=-1).any(dim=-1)
        self.codes[:, cells] = self.noise.categorical(p)
