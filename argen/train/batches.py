"""The order in which a run reads its data: one fixed order by global index for map-style datasets, whatever the
process count, and resumable per-worker positions for streamed ones."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, epoch, rank, ...) by numpy's SeedSequence."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] % 2**63)


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This process's micro-batches of one epoch, in a fixed order that does not depend on the process count.

    The epoch's order is `randperm(num_samples)` seeded by (seed, epoch). It is cut into global micro-batches of
    `micro_batch * num_processes` indices; process r takes slice r of each. Iteration starts at micro-batch
    `start`, which is how a resumed run skips what it already consumed without loading it. Optimizer step s reads
    the indices perm[s * B : (s + 1) * B] (B the global batch) on any number of processes and any accumulation.
    """

    def __init__(self, num_samples: int, *, seed: int, epoch: int, micro_batch: int, num_micro: int,
                 num_processes: int, process_index: int, start: int = 0) -> None:
        self.num_samples, self.seed, self.epoch, self.micro_batch = num_samples, seed, epoch, micro_batch
        self.num_micro, self.num_processes, self.process_index, self.start = num_micro, num_processes, process_index, start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=gen)  # kept as a tensor: 10M indices are 80 MB, a list 10x more
        global_micro = self.micro_batch * self.num_processes
        for k in range(self.start, self.num_micro):
            base = k * global_micro + self.process_index * self.micro_batch
            yield perm[base:base + self.micro_batch].tolist()

    def __len__(self) -> int:
        return self.num_micro - self.start


@runtime_checkable
class TrainingStream(Protocol):
    """A streamed dataset (an IterableDataset with no length) that the loop can train on and resume exactly."""

    def training_stream(self, *, seed: int, rank: int, world_size: int,
                        start: dict[str, list[int]] | None) -> torch.utils.data.IterableDataset:
        """This process's endless share of the data, split over the DataLoader workers that iterate it.

        Slot `rank * num_workers + worker` reads its own part. Every item carries "stream_position": an int64 tensor
        whose first entry is the slot and the rest say where the slot continues after this item. `start` maps str(slot)
        to such a position (slots not in it start from the beginning).
        """
        ...


class Batches:
    """This process's micro-batches from a given optimizer step on, endlessly (epoch after epoch).

    Map-style datasets go through `ShardedBatchSampler`; a `TrainingStream` through its `training_stream`, with
    the position of each slot after the last batch the loop took kept in `positions` for the next checkpoint.
    """

    def __init__(self, dataset: Any, *, seed: int, batch_size: int, micro_batch: int, grad_accum: int,
                 num_processes: int, process_index: int, num_workers: int, collate_fn: Callable[[list[Any]], Any] | None,
                 pin_memory: bool) -> None:
        self.dataset, self.seed, self.batch_size, self.micro_batch = dataset, seed, batch_size, micro_batch
        self.grad_accum, self.num_processes, self.process_index = grad_accum, num_processes, process_index
        self.num_workers, self.collate_fn, self.pin_memory = num_workers, collate_fn, pin_memory
        self.streamed = isinstance(dataset, torch.utils.data.IterableDataset)
        self.positions: dict[str, list[int]] = {}
        if self.streamed and not isinstance(dataset, TrainingStream):
            raise TypeError(f"{type(dataset).__name__} is a streamed dataset without training_stream(): the loop cannot "
                            "split it over processes and workers or resume it; use a map-style dataset or implement "
                            "argen.train.batches.TrainingStream.")
        if not self.streamed:
            self.steps_per_epoch = len(dataset) // batch_size
            if self.steps_per_epoch < 1:
                raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch of {batch_size}.")

    @property
    def layout(self) -> list[int]:
        """[processes, DataLoader workers]: the slots a streamed dataset's positions belong to."""
        return [self.num_processes, self.num_workers]

    def from_step(self, step: int, *, positions: dict[str, list[int]] | None = None) -> Iterator[Any]:
        """Micro-batches from optimizer step `step` on (a stream continues from `positions` instead)."""
        if self.streamed:
            return self._stream(positions)
        return self._epochs(step)

    def _epochs(self, step: int) -> Iterator[Any]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.grad_accum
        while True:
            sampler = ShardedBatchSampler(len(self.dataset), seed=self.seed, epoch=epoch, micro_batch=self.micro_batch,
                                          num_micro=self.steps_per_epoch * self.grad_accum,
                                          num_processes=self.num_processes, process_index=self.process_index, start=start)
            # An explicit generator keeps worker seeds off the global RNG (DataLoader would draw from it).
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(seed_for(self.seed, epoch, self.process_index)))
            yield from loader
            epoch, start = epoch + 1, 0

    def _stream(self, positions: dict[str, list[int]] | None) -> Iterator[Any]:
        self.positions = dict(positions or {})
        stream = self.dataset.training_stream(seed=self.seed, rank=self.process_index, world_size=self.num_processes,
                                              start=self.positions)
        loader = torch.utils.data.DataLoader(stream, batch_size=self.micro_batch, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            where = batch.get("stream_position") if isinstance(batch, dict) else None
            if where is None or len(where) == 0:
                raise ValueError("a batch of a streamed dataset has no 'stream_position': the collate function must keep "
                                 "it (stacked, as torch's and argen.data.skips.collate do) so the run can resume where it "
                                 "stopped.")
            last = [int(x) for x in where[-1]]  # the items of one batch come from one worker, in order
            self.positions[str(last[0])] = last
            yield batch
