"""Quantizers behind one interface: l2-normalised low-dim VQ (EMA, k-means init, dead-code restart), a product of
two VQs, and FSQ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Rows of (samples x codes) distances computed at once; bounds the memory of a lookup to ~64 MiB of fp32.
_DIST_CHUNK_ELEMS = 1 << 24


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    quantized:     (B, D, h, w) fp32, the straight-through output to feed the decoder (D = quantizer.dim).
    indices:       (B, h, w) int64 in [0, num_codes).
    loss:          scalar, the total quantizer loss to add to the training loss (= commit_loss + codebook_loss).
    commit_loss:   scalar, beta * ||z - sg(q)||^2 (already weighted by beta); zero for FSQ.
    codebook_loss: scalar, ||sg(z) - q||^2; zero for FSQ and for EMA codebooks.
    perplexity:    scalar, exp(entropy) of this batch's code histogram on this process (logging only).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, D) tensors from every rank, in rank order, on every rank (N_r may differ)."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_list = [int(s.item()) for s in sizes]
    padded = x.new_zeros(max(sizes_list), x.shape[1])
    padded[: x.shape[0]] = x
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes_list)])


def _broadcast_from_rank_zero(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(x, src=0)
    return x


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _sample_rows(num_rows: int, num_samples: int, *, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of `num_samples` rows out of `num_rows`: without replacement when there are enough rows."""
    if num_rows >= num_samples:
        return torch.randperm(num_rows, device=device, generator=generator)[:num_samples]
    return torch.randint(num_rows, (num_samples,), device=device, generator=generator)


def _sample_far_rows(x: torch.Tensor, live: torch.Tensor, num_samples: int, *,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Indices of `num_samples` rows of x (N, D) drawn with probability proportional to the squared
    Euclidean distance to the nearest row of `live` (L, D); uniform when nothing is live or every row is
    already fitted exactly. Without replacement when there are enough rows of nonzero weight."""
    if live.shape[0] == 0:
        return _sample_rows(x.shape[0], num_samples, device=x.device, generator=generator)
    nearest = live[nearest_code(x, live, cosine=False)]  # (N, D)
    weight = (x - nearest).pow(2).sum(-1)  # (N,)
    positive = int((weight > 0).sum())
    if positive == 0:
        return _sample_rows(x.shape[0], num_samples, device=x.device, generator=generator)
    return torch.multinomial(weight, num_samples, replacement=positive < num_samples, generator=generator)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, cosine: bool) -> torch.Tensor:
    """Index of the nearest codebook row for each row of x: (N, D), (K, D) -> (N,) int64.

    cosine=True assumes both are l2-normalised and maximises the dot product (same argmin as Euclidean
    distance on the sphere). Otherwise minimises ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, dropping ||x||^2.
    """
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    chunk = max(1, _DIST_CHUNK_ELEMS // max(1, codebook.shape[0]))
    sq_norms = None if cosine else codebook.pow(2).sum(-1)  # (K,)
    for start in range(0, x.shape[0], chunk):
        sim = x[start : start + chunk] @ codebook.t()  # (n, K)
        if cosine:
            out[start : start + chunk] = sim.argmax(-1)
        else:
            out[start : start + chunk] = (sq_norms - 2 * sim).argmin(-1)
    return out


def kmeans(
    samples: torch.Tensor,
    num_clusters: int,
    *,
    iters: int,
    spherical: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means: (N, D) samples -> centroids (K, D) and cluster sizes (K,) of the final assignment.

    Centroids start at K distinct random samples (drawn with `generator` or torch's global RNG).
    spherical=True keeps the centroids on the unit sphere and assigns by cosine similarity.
    An empty cluster keeps its previous centroid.
    """
    idx = _sample_rows(samples.shape[0], num_clusters, device=samples.device, generator=generator)
    centroids = samples[idx].clone()
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(iters):
        assign = nearest_code(samples, centroids, cosine=spherical)
        counts = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        means = sums / counts.clamp(min=1).unsqueeze(-1)
        if spherical:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, means, centroids)
    return centroids, counts


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(-sum p log p) of a code histogram (K,): 1 when one code is used, K when all are used equally."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())


class Quantizer(nn.Module):
    """Common interface: forward(z) -> QuantizerOutput, encode(z) -> indices, codes_to_vectors(indices).

    Subclasses set `dim` (channels consumed, D) and `num_codes` (K). Usage statistics are tracked in
    training mode only, like BatchNorm's running statistics: the buffer `steps_since_used` (K,) counts the
    training forwards since each code was last chosen on any process (counts are summed over processes,
    so the buffer is identical on every rank).
    """

    dim: int
    num_codes: int

    def _init_usage(self) -> None:
        self.register_buffer("steps_since_used", torch.zeros(self.num_codes, dtype=torch.long))

    def _check_input(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}.")

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"code indices must be an integer tensor, got dtype {indices.dtype}.")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"code indices must lie in [0, {self.num_codes}), got min {int(indices.min())}, max {int(indices.max())}."
            )

    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        """counts: (K,) code histogram summed over all processes for this training step."""
        self.steps_since_used += 1
        self.steps_since_used.masked_fill_(counts > 0, 0)

    def num_dead_codes(self, *, unused_for: int) -> int:
        """How many codes no process has chosen in the last `unused_for` training forwards."""
        if unused_for < 1:
            raise ValueError(f"unused_for must be >= 1, got {unused_for}.")
        return int((self.steps_since_used >= unused_for).sum())

    def encode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ (van den Oord et al. 2017) with the options that keep a codebook alive.

    Training loss, VQ-VAE eq. 3 with e = q the chosen code and z = z_e(x) the encoder output:

        L_vq = ||sg[z] - q||^2  +  beta * ||z - sg[q]||^2
               codebook term      commitment term (trains the encoder)

    (taming-transformers' `legacy=True` puts beta on the codebook term instead.) With `ema=True` the
    codebook term is replaced by exponential moving averages of the assigned encoder outputs.

    l2_normalize=True (ViT-VQGAN / LlamaGen): z and the codebook rows are l2-normalised and the lookup is by
    cosine similarity; both loss terms are on the unit sphere. The projection to the low codebook_dim and back
    lives in the model (quant_conv / post_quant_conv).

    State (buffers, all saved in the state dict): `initialized` (k-means done), `steps_since_used`, and for
    EMA `cluster_size` and `embed_sum`. State changes happen in training mode only; k-means and dead-code
    restarts run at the start of a forward (before the codebook enters the autograd graph), EMA updates at
    its end. Across processes every change is identical on every rank: statistics are summed with
    all_reduce, and random draws happen on rank 0 and are broadcast.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        l2_normalize: bool = True,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: int = 0,
        rotation_trick: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        if dim < 1 or codebook_size < 2:
            raise ValueError(f"need dim >= 1 and codebook_size >= 2, got dim={dim}, codebook_size={codebook_size}.")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}.")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 disables restarts), got {dead_code_threshold}.")
        self.dim, self.num_codes = dim, codebook_size
        self.l2_normalize, self.beta = l2_normalize, beta
        self.ema, self.ema_decay, self.eps = ema, ema_decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.rotation_trick = rotation_trick

        if l2_normalize:
            init = F.normalize(torch.randn(codebook_size, dim), dim=-1)
        else:
            init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)  # (K, D), moved by EMA, never by the optimizer
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,) EMA of assignment counts
            self.register_buffer("embed_sum", init.clone())  # (K, D) EMA of the sums of assigned z
        else:
            self.codebook = nn.Parameter(init)  # (K, D)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self._init_usage()

    def _codebook_for_lookup(self) -> torch.Tensor:
        codebook = self.codebook.float()  # fp32 even if someone cast the module
        return F.normalize(codebook, dim=-1) if self.l2_normalize else codebook

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        flat = rearrange(z.float(), "b d h w -> (b h w) d")
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> indices (B, h, w) int64. Pure: never changes the codebook or statistics."""
        self._check_input(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            idx = nearest_code(self._flatten(z), self._codebook_for_lookup(), cosine=self.l2_normalize)
        return rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w)

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> code vectors (B, D, h, w) fp32, exactly what forward puts in `quantized`."""
        self._check_indices(indices)
        vectors = F.embedding(indices.long(), self._codebook_for_lookup())  # (B, h, w, D)
        return rearrange(vectors, "b h w d -> b d h w").contiguous()

    def forward(self, z: torch.Tensor, *, generator: torch.Generator | None = None) -> QuantizerOutput:
        """z: (B, D, h, w) encoder output (any float dtype; all math runs in fp32 with autocast off).

        `generator` (on z's device; default: torch's global RNG) drives the random draws of k-means init
        and dead-code restarts, so a training loop that checkpoints RNG state resumes exactly.
        """
        self._check_input(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)  # (N, D), N = B*h*w
            if self.training:
                if not bool(self.initialized):
                    self._kmeans_init(flat.detach(), generator=generator)
                if self.dead_code_threshold > 0:
                    self._restart_dead_codes(flat.detach(), generator=generator)
            codebook = self._codebook_for_lookup()  # (K, D)
            idx = nearest_code(flat.detach(), codebook.detach(), cosine=self.l2_normalize)  # (N,)
            q = F.embedding(idx, codebook)  # (N, D)

            commit_loss = self.beta * F.mse_loss(flat, q.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z.device)
            else:
                codebook_loss = F.mse_loss(q, flat.detach())

            if self.rotation_trick:
                st = _rotate_onto(flat, q.detach())
            else:
                # Straight-through: the value is exactly q, the gradient flows to z unchanged (and not to q).
                st = q.detach() + (flat - flat.detach())

            counts = torch.bincount(idx, minlength=self.num_codes).float()  # (K,)
            perplexity = perplexity_from_counts(counts)
            if self.training:
                self._update_statistics(flat.detach(), idx, counts.clone())

        return QuantizerOutput(
            quantized=rearrange(st, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous(),
            indices=rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w),
            loss=commit_loss + codebook_loss,
            commit_loss=commit_loss,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, *, generator: torch.Generator | None) -> None:
        """Set the codebook to k-means centroids of this batch's encoder outputs, gathered from every process."""
        samples = _all_gather_rows(flat)
        centroids = torch.empty(self.num_codes, self.dim, device=flat.device)
        counts = torch.empty(self.num_codes, device=flat.device)
        if _is_rank_zero():
            centroids, counts = kmeans(
                samples, self.num_codes, iters=self.kmeans_iters, spherical=self.l2_normalize, generator=generator
            )
        _broadcast_from_rank_zero(centroids)
        _broadcast_from_rank_zero(counts)
        self.codebook.copy_(centroids)
        if self.ema:
            self.cluster_size.copy_(counts.clamp(min=1.0))
            self.embed_sum.copy_(centroids * self.cluster_size.unsqueeze(-1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, *, generator: torch.Generator | None) -> None:
        """Move codes unused for `dead_code_threshold` steps onto encoder outputs of this batch, drawn with
        probability proportional to their squared distance to the nearest live code (k-means++ seeding).

        Uniform draws land mostly where the data is dense and already well coded (on shapes, ~85% of the
        vectors are plain background), so a collapsed codebook stays collapsed; D^2 draws land on the
        vectors the codebook fits worst. `steps_since_used` is identical on every rank, so every rank agrees
        on the dead set; rank 0 draws the replacements from its own batch and broadcasts them.
        """
        dead = self.steps_since_used >= self.dead_code_threshold  # (K,)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        new = torch.empty(num_dead, self.dim, device=flat.device)
        if _is_rank_zero():
            new = flat[_sample_far_rows(flat, self._codebook_for_lookup()[~dead], num_dead, generator=generator)]
        _broadcast_from_rank_zero(new)
        self.codebook[dead] = new
        self.steps_since_used.masked_fill_(dead, 0)
        if self.ema:
            self.cluster_size.masked_fill_(dead, 1.0)
            self.embed_sum[dead] = new

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        if self.ema:
            sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, idx, flat)  # (K, D)
            stats = _all_reduce_sum(torch.cat([counts.unsqueeze(-1), sums], dim=-1))  # one collective
            counts, sums = stats[:, 0], stats[:, 1:]
            # VQ-VAE appendix A.1: N_i <- g N_i + (1-g) n_i ; m_i <- g m_i + (1-g) sum_j z_ij ; e_i = m_i / N_i,
            # with Laplace smoothing of N_i so that a rarely used code does not divide by ~0.
            self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            embed = self.embed_sum / smoothed.unsqueeze(-1)
            self.codebook.copy_(F.normalize(embed, dim=-1) if self.l2_normalize else embed)
        else:
            counts = _all_reduce_sum(counts)
        self._update_usage(counts)


class ProductQuantizer(Quantizer):
    """Two VQ codebooks over two channel groups of z (product quantisation, Jegou et al. 2011): the first
    `first.dim` channels pick code a of `first`, the rest code b of `second`, and the code is a * second.num_codes + b.
    `VQModel` with `colour_codes` feeds it a patch's colour-free structure and its colour, so that a GPT can learn
    shape and colour apart (`GPTConfig.code_factors`)."""

    def __init__(self, first: VectorQuantizer, second: VectorQuantizer):
        super().__init__()
        self.first, self.second = first, second
        self.dim = first.dim + second.dim
        self.num_codes = first.num_codes * second.num_codes

    def num_dead_codes(self, *, unused_for: int) -> int:
        """Dead rows of the two codebooks together."""
        return self.first.num_dead_codes(unused_for=unused_for) + self.second.num_dead_codes(unused_for=unused_for)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * self.second.num_codes + b

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z)
        return self._join(self.first.encode(z[:, : self.first.dim]), self.second.encode(z[:, self.first.dim :]))

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        self._check_indices(indices)
        k = self.second.num_codes
        return torch.cat([self.first.codes_to_vectors(indices // k), self.second.codes_to_vectors(indices % k)], dim=1)

    def forward(self, z: torch.Tensor, *, generator: torch.Generator | None = None) -> QuantizerOutput:
        self._check_input(z)
        a = self.first(z[:, : self.first.dim], generator=generator)
        b = self.second(z[:, self.first.dim :], generator=generator)
        indices = self._join(a.indices, b.indices)
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).float()
        return QuantizerOutput(
            quantized=torch.cat([a.quantized, b.quantized], dim=1),
            indices=indices,
            loss=a.loss + b.loss,
            commit_loss=a.commit_loss + b.commit_loss,
            codebook_loss=a.codebook_loss + b.codebook_loss,
            perplexity=perplexity_from_counts(counts),
        )


def _rotate_onto(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv 2410.06424): (N, D) rows -> rows equal to q in value.

    Output = sg(|q|/|z|) * sg(R) z, with R = I - 2 r r^T + 2 q^ z^T the rotation taking z^ = z/|z| onto
    q^ = q/|q| (r = normalise(z^ + q^)). The gradient w.r.t. z is the decoder gradient rotated by R^T and
    scaled, rather than copied as in the straight-through estimator.
    """
    z_hat = F.normalize(z, dim=-1).detach()
    q_hat = F.normalize(q, dim=-1).detach()
    r = F.normalize(z_hat + q_hat, dim=-1).detach()
    scale = (q.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)).detach()
    rotated = z - 2 * (z * r).sum(-1, keepdim=True) * r + 2 * (z * z_hat).sum(-1, keepdim=True) * q_hat
    return scale * rotated


class FSQGrid(NamedTuple):
    """Per-channel FSQ constants, each (D,): see FSQuantizer for the bound they define."""

    half_l: torch.Tensor  # fp32
    offset: torch.Tensor  # fp32, 0.5 for even levels
    shift: torch.Tensor  # fp32, atanh(offset / half_l)
    half_width: torch.Tensor  # fp32, floor(L / 2)
    levels: torch.Tensor  # int64
    basis: torch.Tensor  # int64, mixed-radix place values: index = sum(digit_i * basis_i)


class FSQuantizer(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505): no codebook, no auxiliary loss.

    Each of the D = len(levels) channels is bounded to L_i values and rounded with a straight-through
    gradient; the implicit codebook is the grid of prod(levels) points. For channel i with L levels:

        bounded = tanh(z + shift) * half_l - offset,  half_l = (L - 1)(1 + eps) / 2,
        offset = 0.5 for even L (else 0),  shift = atanh(offset / half_l)   (so z = 0 maps to 0),

    and round(bounded) takes the L integers -floor(L/2) .. ceil(L/2) - 1 (even L is asymmetric: the
    half-offset). Codes are those integers divided by floor(L/2), in [-1, 1].
    """

    def __init__(self, *, levels: tuple[int, ...], eps: float = 1e-3):
        super().__init__()
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be a non-empty tuple of ints >= 2, got {levels}.")
        self.levels, self.eps = levels, eps
        self.dim, self.num_codes = len(levels), math.prod(levels)
        self._init_usage()

    def grid_constants(self, device: torch.device | str = "cpu") -> FSQGrid:
        """Per-channel constants (D,) of the bound, computed in float64 and returned fp32 on `device`.

        Built on demand rather than stored as buffers, so `model.half()` cannot round them.
        """
        lv = torch.tensor(self.levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = (lv % 2 == 0).double() * 0.5
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.long), dim=0)  # mixed radix
        fp32 = dict(device=device, dtype=torch.float32)
        return FSQGrid(
            half_l=half_l.to(**fp32),
            offset=offset.to(**fp32),
            shift=torch.atanh(offset / half_l).to(**fp32),
            half_width=torch.div(lv, 2, rounding_mode="floor").to(**fp32),
            levels=lv.long().to(device),
            basis=basis.to(device),
        )

    def _round(self, z: torch.Tensor, c: FSQGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) fp32 -> (straight-through integers, integer values), both (..., D) fp32."""
        bounded = torch.tanh(z + c.shift) * c.half_l - c.offset
        rounded = torch.round(bounded)
        # Straight-through: the value is exactly `rounded` (bounded - bounded.detach() == 0), the gradient d bounded.
        return rounded + (bounded - bounded.detach()), rounded

    @staticmethod
    def _digits_to_indices(rounded: torch.Tensor, c: FSQGrid) -> torch.Tensor:
        digits = (rounded + c.half_width).long()  # (..., D) in [0, L_i)
        return (digits * c.basis).sum(-1)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> indices (B, h, w) int64."""
        self._check_input(z)
        c = self.grid_constants(z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, rounded = self._round(rearrange(z.float(), "b d h w -> b h w d"), c)
        return self._digits_to_indices(rounded, c)

    def codes_to_vectors(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> grid points (B, D, h, w) fp32 in [-1, 1], exactly what forward returns."""
        self._check_indices(indices)
        c = self.grid_constants(indices.device)
        digits = torch.remainder(torch.div(indices.long().unsqueeze(-1), c.basis, rounding_mode="floor"), c.levels)
        codes = (digits.float() - c.half_width) / c.half_width  # (B, h, w, D)
        return rearrange(codes, "b h w d -> b d h w").contiguous()

    def forward(self, z: torch.Tensor, *, generator: torch.Generator | None = None) -> QuantizerOutput:
        """z: (B, D, h, w), any float dtype; rounding runs in fp32 (bf16 cannot represent the grid offsets).

        `generator` is accepted for interface parity and unused.
        """
        self._check_input(z)
        c = self.grid_constants(z.device)
        with torch.autocast(device_type=z.device.type, enabled=False):
            st, rounded = self._round(rearrange(z.float(), "b d h w -> b h w d"), c)
            quantized = st / c.half_width  # (B, h, w, D)
            indices = self._digits_to_indices(rounded, c)  # (B, h, w)
            counts = torch.bincount(indices.flatten(), minlength=self.num_codes).float()
            if self.training:
                self._update_usage(_all_reduce_sum(counts.clone()))
            zero = torch.zeros((), device=z.device)
            return QuantizerOutput(
                quantized=rearrange(quantized, "b h w d -> b d h w").contiguous(),
                indices=indices,
                loss=zero,
                commit_loss=zero,
                codebook_loss=zero,
                perplexity=perplexity_from_counts(counts),
            )
