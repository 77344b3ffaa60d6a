"""Speculative Jacobi decoding of image tokens: a window of drafts verified per forward pass, exactly the model's
distribution (Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free
Speculative Jacobi Decoding", with the acceptance rule of Leviathan et al. 2023 and Chen et al. 2023)."""

from __future__ import annotations

import math

import torch

from argen.model.gpt import GPT, KVCache, RowPositions
from argen.sample import Decoded, RowNoise, SamplingConfig, code_probabilities, guided_code_logits


class SpeculativeDecoder:
    """Speculative Jacobi decoding of the image codes of a batch of prefixes; `run()` returns them (see `step`).

    rows: int64 (R, P) prefixes in the batch order [cond; uncond] (R = 2B with guidance, else B). config: the
    SamplingConfig (decoding, window, temperature, top-k, top-p, guidance). banned: bool (N, K) or (B, N, K), the codes
    a position may not take (`decode_image_tokens`' allowed_codes), or None. noise: the rows' random draws.
    The constructor prefills the cache with every prefix but its last token (BOI, which opens each row's first window).
    """

    def __init__(self, model: GPT, rows: torch.Tensor, *, batch_size: int, image_offset: int, num_codes: int,
                 config: SamplingConfig, banned: torch.Tensor | None, noise: RowNoise, cache_dtype: torch.dtype) -> None:
        cfg = model.config
        self.model, self.rows, self.config, self.banned, self.noise = model, rows, config, banned, noise
        self.B, self.R, self.P = batch_size, rows.shape[0], rows.shape[1]
        self.N, self.K, self.grid_w = cfg.num_image_tokens, num_codes, cfg.image_grid[1]
        self.L = min(config.window, self.N)
        self.image_offset = image_offset
        device = self.device = rows.device
        self.slots = torch.arange(self.L, device=device)
        self.at = torch.arange(self.B, device=device)
        self.scales = torch.tensor([config.scale_at(i, self.N) for i in range(self.N)], device=device)  # (N,)
        self.cache = KVCache.allocate(cfg, self.R, device=device, dtype=cache_dtype)
        self.forward_passes = 0
        if self.P > 1:
            model(rows[:, : self.P - 1], cache=self.cache, start=0, logits_from=self.P - 2)  # only the cache is kept
            self.forward_passes += 1
        B, L = self.B, self.L
        self.seq = torch.zeros(B, self.N, dtype=torch.long, device=device)  # committed codes below n, drafts from n on
        self.q = torch.empty(B, L, self.K, device=device)  # the draft distribution of window slot j
        self.n = torch.zeros(B, dtype=torch.long, device=device)  # committed tokens per row
        self.s = torch.zeros(B, dtype=torch.long, device=device)  # window start: slot j predicts token s + j
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=device)
        self.index = torch.arange(B, device=device)  # each row's place in the batch as given (finished rows leave)
        self.codes = torch.empty(B, self.N, dtype=torch.long, device=device)  # finished rows' codes, in that order
        self.finished_nonfinite = torch.zeros(B, dtype=torch.bool, device=device)
        self._draft(torch.ones(B, L, dtype=torch.bool, device=device))

    def run(self) -> Decoded:
        while self.B:
            self.step()
        return Decoded(codes=self.codes, forward_passes=self.forward_passes, nonfinite=self.finished_nonfinite)

    def _retire_finished(self) -> None:
        """Move the rows that committed all their tokens out of the batch (and out of the cache), so later forward
        passes compute only the rows still decoding."""
        done = self.n >= self.N
        if not bool(done.any()):
            return
        self.codes[self.index[done]] = self.seq[done]
        self.finished_nonfinite[self.index[done]] = self.nonfinite[done]
        keep = (~done).nonzero().flatten()
        keep_rows = torch.cat([keep + i * self.B for i in range(self.R // self.B)])  # the cond rows, then the uncond
        for name in ("seq", "q", "n", "s", "nonfinite", "index"):
            setattr(self, name, getattr(self, name)[keep])
        self.rows = self.rows[keep_rows]
        self.cache = self.cache.rows(keep_rows)
        self.noise = self.noise.subset(keep.tolist())
        self.R = self.R // self.B * len(keep)
        self.B = len(keep)
        self.at = torch.arange(self.B, device=self.device)

    def step(self) -> None:
        """One forward pass: every row's window is predicted, its drafts checked, and 1 to `window` tokens committed.

        Output slot j of a row predicts token s + j from the row's committed tokens and the drafts before it. The
        drafts are checked left to right: one drawn from q is accepted with probability min(1, p(x) / q(x)); at the
        first rejection the token is drawn from the residual max(p - q, 0) instead, and the row commits its accepted
        drafts plus that token (all of them when none is rejected). So every committed token is a draw from p given
        the tokens before it, whatever q is: the images follow the model's distribution exactly. The drafts after a
        rejection are drawn again from this forward's predictions (the Jacobi iteration). With temperature 0 a draft is
        accepted when it is the argmax and a rejected one replaced by the argmax: the same tokens as one per forward.
        The cache keeps what the committed tokens wrote; the positions of rejected drafts are rewritten next step.
        """
        B, R, P, N, K, L = self.B, self.R, self.P, self.N, self.K, self.L
        at, slots, seq, n, s, config = self.at, self.slots, self.seq, self.n, self.s, self.config
        t = s[:, None] + slots  # (B, L) token index each slot predicts
        boi = self.rows[:B, P - 1 : P]
        inputs = torch.where(t == 0, boi, seq.gather(1, (t - 1).clamp(min=0)) + self.image_offset)  # slot j reads t - 1
        positions = RowPositions.at((P - 1 + s).repeat(R // B), L)
        logits = self.model(inputs.repeat(R // B, 1), cache=self.cache, start=positions)  # (R, L, V)
        self.forward_passes += 1
        logits = guided_code_logits(logits, t, image_offset=self.image_offset, num_codes=K, scales=self.scales,
                                    banned=self.banned)  # (B, L, K)
        p = code_probabilities(logits, config) if config.temperature > 0 else None
        open_ = t >= n[:, None]  # slots not committed yet
        x = seq.gather(1, t)  # their drafts
        if p is None:  # greedy
            best = logits.argmax(dim=-1)  # (B, L)
            self.nonfinite |= (logits.isnan().any(dim=-1) & open_).any(dim=-1)
            accept = x == best
        else:
            self.nonfinite |= (p.isnan().any(dim=-1) & open_).any(dim=-1)
            p_x, q_x = p.gather(-1, x[..., None])[..., 0], self.q.gather(-1, x[..., None])[..., 0]
            accept = self.noise.uniform(L, device=self.device) * q_x < p_x  # u < p(x) / q(x)
        run = (accept | ~open_).long().cumprod(dim=1).sum(dim=1)  # (B,) leading accepted slots, L when all are
        rejected = run < L
        r = run.clamp(max=L - 1)  # slot of the first rejection, where there is one
        if p is None:
            fix = best[at, r]
        else:
            p_r = p[at, r]  # (B, K)
            residual = (p_r - self.q[at, r]).clamp_(min=0)
            mass = residual.sum(dim=-1, keepdim=True)
            # p = q up to rounding leaves no residual mass; a rejection is then a rounding event: draw from p
            fix = self.noise.categorical(torch.where(mass > 1e-12, residual / mass.clamp(min=1e-30), p_r))
        seq[at, t[at, r]] = torch.where(rejected, fix, seq[at, t[at, r]])
        n_new = torch.where(rejected, s + r + 1, s + L)
        # the Jacobi step: the slots after a rejection get new drafts from this forward's predictions
        later = rejected[:, None] & (slots[None] > r[:, None])
        redraft = best if p is None else self.noise.categorical(p)
        seq.scatter_(1, t, torch.where(later, redraft, seq.gather(1, t)))
        if p is not None:
            self.q = torch.where(later[..., None], p, self.q)
        # slide each window to its new start (never past the last token), then draft the slots that entered it
        s_new = n_new.clamp(max=N - L)
        old_slot = (s_new - s)[:, None] + slots  # (B, L) the old slot of each new slot
        self.q = self.q.gather(1, old_slot.clamp(max=L - 1)[..., None].expand(B, L, K))
        self.n, self.s = n_new, s_new
        self._draft(old_slot >= L)
        self._retire_finished()

    def _draft(self, fresh: torch.Tensor) -> None:
        """Draft the window slots `fresh` (B, L), in place in seq and q.

        "jacobi" draws a uniform code (q uniform, as in the SJD paper). "spatial" copies the token above (on the first
        row, the one to its left) with a point-mass q: image codes repeat down the columns of uniform areas. A copied
        token may itself be a fresh draft, so the copy runs once per grid row the window spans, plus once per token
        of the first row."""
        t = self.s[:, None] + self.slots  # (B, L)
        if self.config.decoding == "spatial":
            src = torch.where(t >= self.grid_w, t - self.grid_w, t - 1).clamp(min=0)
            first_row = bool((t[:, 0] < self.grid_w).any())  # copies to the left chain along the row
            for _ in range(math.ceil(self.L / self.grid_w) + 1 + (self.grid_w if first_row else 0)):
                self.seq.scatter_(1, t, torch.where(fresh, self.seq.gather(1, src), self.seq.gather(1, t)))
            drafts = torch.nn.functional.one_hot(self.seq.gather(1, t), self.K).to(self.q.dtype)
        else:  # drawn for every slot, used for the fresh ones: a row's draws do not depend on the others'
            drafts = torch.full_like(self.q, 1.0 / self.K)
            self.seq.scatter_(1, t, torch.where(fresh, self.noise.categorical(drafts), self.seq.gather(1, t)))
        self.q.copy_(torch.where(fresh[..., None], drafts, self.q))
