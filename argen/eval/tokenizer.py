"""Tokenizer quality over a whole validation set: PSNR, SSIM, codebook usage, perplexity, judge agreement, speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from argen.data.skips import collate
from tokenizers_img.metrics import CodebookUsage, MeanAccumulator, psnr, ssim
from tokenizers_img.vq_model import VQModel


@dataclass(frozen=True)
class TokenizerMetrics:
    """Figures over every image of the set (not a rolling buffer). judge_* are None off the shapes data."""

    num_images: int
    psnr: float                  # dB, images in [-1, 1] mapped to [0, 1], mean over images
    ssim: float                  # mean over images
    codebook_usage: float        # fraction of the K codes used at least once over the whole set
    perplexity: float            # exp entropy of the code histogram over the whole set
    used_codes: int
    num_codes: int
    judge_agreement: float | None      # parse(reconstruction) == parse(original), fraction of images
    judge_recon_correct: float | None  # judge(caption, reconstruction).correct, fraction of images
    images_per_s: float          # encode + decode throughput on this device (excludes data loading)

    def as_dict(self) -> dict:
        return asdict(self)


def _uint8(images: torch.Tensor) -> "list":
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 numpy arrays."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def evaluate_tokenizer(
    model: VQModel,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    judge: bool = False,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
    progress: bool = False,
) -> TokenizerMetrics:
    """Encode and decode every image of `dataset` (its first `max_images`), and score the reconstructions.

    With several processes, each takes every `world_size`-th image from `rank`; `reduce(tensor)` must sum a
    tensor over processes (for example accelerate's `accelerator.reduce(t, "sum")`). `judge` adds the shapes
    judge's agreement between originals and reconstructions (shapes data only: it needs captions of that world).
    """
    if judge:
        from argen.eval.judge import judge as judge_fn
        from argen.eval.judge import parse
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = Subset(dataset, list(range(rank, n, world_size)))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    usage = CodebookUsage(model.num_codes, device=device)
    psnr_acc, ssim_acc = MeanAccumulator(device=device), MeanAccumulator(device=device)
    agree, correct = MeanAccumulator(device=device), MeanAccumulator(device=device)
    seconds = 0.0
    for batch in tqdm(loader, desc="eval tokenizer", disable=not progress, leave=False):
        images = batch["image"].to(device)
        start = time.perf_counter()
        codes = model.encode(images)
        recon = model.decode(codes).clamp(-1, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        usage.update(codes)
        psnr_acc.update(psnr(images, recon))
        ssim_acc.update(ssim(images, recon))
        if judge:
            originals, recons = _uint8(images), _uint8(recon)
            agree.update(torch.tensor([parse(a) == parse(b) for a, b in zip(originals, recons)], dtype=torch.float64))
            correct.update(torch.tensor([judge_fn(c, r).correct for c, r in zip(batch["caption"], recons)], dtype=torch.float64))
    model.train(was_training)

    state = torch.stack([psnr_acc.sum, psnr_acc.count, ssim_acc.sum, ssim_acc.count, agree.sum, agree.count,
                         correct.sum, correct.count, torch.tensor(seconds, dtype=torch.float64, device=device)])
    counts = usage.counts
    if world_size > 1:
        state, counts = reduce(state), reduce(counts)
        usage.counts = counts
    ps, pc, ss, sc, a_s, a_c, c_s, c_c, sec = state.tolist()
    return TokenizerMetrics(
        num_images=int(pc),
        psnr=ps / max(pc, 1),
        ssim=ss / max(sc, 1),
        codebook_usage=usage.usage,
        perplexity=usage.perplexity,
        used_codes=int((usage.counts > 0).sum()),
        num_codes=usage.num_codes,
        judge_agreement=a_s / a_c if judge and a_c else None,
        judge_recon_correct=c_s / c_c if judge and c_c else None,
        images_per_s=pc / max(sec / world_size, 1e-9),
    )
