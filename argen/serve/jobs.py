"""The page's jobs (generations and edits of one image): the models behind its columns, a bounded queue and the one
worker thread that runs it.

Cancelling is cooperative: every network call of a column (each GPT decode step, each diffusion step of a unCLIP
prior or decoder) first checks the job's cancel flag, through a PyTorch forward pre-hook held only while the
column runs, so a cancel takes effect within one network call (milliseconds on the demo models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from argen.serve.settings import EDIT_CONFIG, JobRequest, SystemInfo, sample_command

log = logging.getLogger("argen.serve")

MAX_BATCH = 64  # rows per GPT or unCLIP batch, as `argen sample --batch-size`; a row's image does not depend on it


class Cancelled(Exception):
    """The job's cancel flag was seen before a network call."""


class QueueFull(Exception):
    """The queue holds as many waiting jobs as it may; the message says so and when to retry."""


class System(Protocol):
    """A model behind one column of the page."""

    info: SystemInfo

    def modules(self) -> list[nn.Module]:
        """The networks whose every call is a cancel point and a progress step."""

    def expected_calls(self, request: JobRequest) -> int:
        """About how many calls of `modules()` a request makes (for the progress bar)."""

    def generate(self, request: JobRequest) -> Tensor:
        """The request's images (n, 3, H, W) float32 in [-1, 1]."""

    def edit(self, request: JobRequest) -> Tensor:
        """The edit request's images (n, 3, H, W) float32 in [-1, 1] (`request.edit` says which image and how)."""

    def unseen_words(self, prompt: str) -> list[str]:
        """Words of `prompt` the model never saw in a training caption."""


class GPTSystem:
    """The AR token GPT of a pipeline directory (argen.pipeline.Pipeline)."""

    def __init__(self, pipe, info: SystemInfo) -> None:
        self.pipe, self.info = pipe, info

    def modules(self) -> list[nn.Module]:
        gpt = self.pipe.sampler_gpt()
        return [gpt] if isinstance(gpt, nn.Module) else []

    def expected_calls(self, request: JobRequest) -> int:
        per_batch = self.pipe.layout.num_image_tokens  # prefill + one call per next token
        if request.edit is not None:  # "resample": the drafts of a batch in one pass, then their scoring forwards
            from argen.edit import SCORE_ROWS

            per_batch += math.ceil(min(request.n, MAX_BATCH) * EDIT_CONFIG.proposals / SCORE_ROWS)
        return math.ceil(request.n / MAX_BATCH) * per_batch

    def generate(self, request: JobRequest) -> Tensor:
        out = self.pipe.generate(request.prompt, n_per_prompt=request.n, sampling=request.sampling, seed=request.seed,
                                 batch_size=MAX_BATCH)
        return out.images

    def edit(self, request: JobRequest) -> Tensor:
        """Inpaint the source image's region under the request's prompt (argen.edit.inpaint, as Pipeline.inpaint)."""
        from argen.data.transforms import load_image
        from argen.edit import inpaint

        e = request.edit
        out = inpaint(self.pipe, load_image(e.image, name="the source image"), request.prompt,
                      mask=e.region.requested[0], n=request.n, sampling=request.sampling, config=EDIT_CONFIG,
                      seed=request.seed, batch_size=MAX_BATCH)
        return out.images

    def unseen_words(self, prompt: str) -> list[str]:
        return self.pipe.unseen_words(prompt)

    def prompt_tokens(self, prompt: str) -> tuple[int, int]:
        """(tokens of `prompt`, tokens the GPT reads): a longer prompt is cut."""
        _, lengths = self.pipe.text.encode_ids([prompt], text_len=self.pipe.layout.text_len)
        return lengths[0], self.pipe.layout.text_len


class UnclipSystem:
    """One prior (a kind of argen.unclip.priors.PRIORS, or "none") of a unCLIP pipeline directory."""

    def __init__(self, pipe, prior: str, info: SystemInfo) -> None:
        self.pipe, self.prior, self.info = pipe, prior, info

    def sampling(self, request: JobRequest):
        """The UnclipSampling of a request, built as `argen sample` builds it from the same options."""
        from argen.unclip.pipeline import sampling_from_options

        u = request.unclip
        return sampling_from_options(self.prior, prior_steps=u["prior_steps"], prior_cfg=u["prior_cfg"],
                                     decoder_steps=u["decoder_steps"], decoder_cfg=u["decoder_cfg"])

    def modules(self) -> list[nn.Module]:
        return self.pipe.modules()  # the decoder and each prior's network

    def expected_calls(self, request: JobRequest) -> int:
        if request.edit is not None:
            return request.unclip["decoder_steps"]  # variations: the decoder's steps, all images in one batch
        per_batch = self.pipe.calls_per_image(self.sampling(request)) - 1  # the CLIP text tower is not watched
        return math.ceil(request.n / MAX_BATCH) * per_batch

    def generate(self, request: JobRequest) -> Tensor:
        out = self.pipe.generate(request.prompt, n_per_prompt=request.n, seed=request.seed,
                                 sampling=self.sampling(request), batch_size=MAX_BATCH)
        return out.images

    def edit(self, request: JobRequest) -> Tensor:
        """Variations of the source image: its CLIP image embedding decoded n times (argen.unclip.controls.variations,
        as UnclipPipeline.variations), with the request's decoder settings."""
        from argen.data.transforms import load_image
        from argen.unclip.controls import variations

        out = variations(self.pipe, load_image(request.edit.image, name="the source image"), n=request.n,
                         seed=request.seed, decoder=self.sampling(request).decoder)
        return out.images

    def unseen_words(self, prompt: str) -> list[str]:
        return []  # CLIP's tokenizer has no record of the captions it saw


def load_systems(pipeline: str | None, unclip: str | None, *, device: str = "cpu", verify: bool = True) -> list[System]:
    """The page's columns: the AR token GPT of the pipeline directory `pipeline`, then each prior of the unCLIP
    pipeline directory `unclip` (either may be None, not both)."""
    if pipeline is None and unclip is None:
        raise ValueError("give a GPT pipeline directory (--pipeline), a unCLIP one (--unclip), or both.")
    systems: list[System] = []
    if pipeline is not None:
        from argen.pipeline import Pipeline

        pipe = Pipeline.load(pipeline, device=device, verify=verify)
        pipe.sampler_gpt()  # pack the sampling copy now rather than in the first user's job
        vq = pipe.vq.config
        systems.append(GPTSystem(pipe, SystemInfo("gpt", "AR token GPT", "gpt", str(pipeline), vq.resolution,
                                                  vq.grid_size)))
    if unclip is not None:
        from argen.unclip.pipeline import UnclipPipeline
        from argen.unclip.priors import prior_label

        upipe = UnclipPipeline.load(unclip, device=device, verify=verify)
        for prior in upipe.priors:
            systems.append(UnclipSystem(upipe, prior, SystemInfo(f"unclip-{prior}", prior_label(prior), "unclip", str(unclip),
                                                                 upipe.decoder.config.resolution)))
    return systems


@contextlib.contextmanager
def watch_calls(modules: Sequence[nn.Module], on_call: Callable[[], None]) -> Iterator[None]:
    """Run `on_call()` before every forward of each module while the block runs (forward pre-hooks, removed on exit).
    An exception from `on_call` stops the forward: that is how a job is cancelled inside a pipeline's loop."""
    handles = [m.register_forward_pre_hook(lambda module, args: on_call()) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def png_bytes(image: Tensor) -> bytes:
    """A (3, H, W) image in [-1, 1] as PNG bytes carrying argen's mark."""
    from PIL.PngImagePlugin import PngInfo

    from argen.data.transforms import tensor_to_pil
    from tokenizers_img.serialization import PNG_MARK

    info = PngInfo()
    info.add_text(*PNG_MARK)
    buf = io.BytesIO()
    tensor_to_pil(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@dataclass
class Column:
    """One system's images in a job: PNG bytes, filled when the system finishes; `note` says why it was skipped."""

    system: SystemInfo
    images: list[bytes] = field(default_factory=list)
    note: str = ""
    seconds: float | None = None


@dataclass
class Job:
    """One request on its way through the queue. `state`: queued, running, done, cancelled or failed."""

    id: str
    request: JobRequest
    columns: list[Column]
    warnings: list[str]
    state: str = "queued"
    message: str = ""
    progress: float = 0.0
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")

    def nbytes(self) -> int:
        return sum(len(png) for c in self.columns for png in c.images)

    def settings(self) -> dict[str, Any]:
        """The request and each column's settings, as downloaded with the images; an edit's says what it edited."""
        r = self.request
        if r.edit is None:
            out = {"prompt": r.prompt, "n": r.n, "seed": r.seed, "gpt_sampling": dataclasses.asdict(r.sampling),
                   "unclip_sampling": r.unclip}
        elif r.edit.tool == "inpaint":  # an edit records only the settings it reads
            out = {"edit": r.edit.record(), "prompt": r.prompt, "n": r.n, "seed": r.seed,
                   "gpt_sampling": dataclasses.asdict(r.sampling)}
        else:
            out = {"edit": r.edit.record(), "n": r.n, "seed": r.seed,
                   "decoder_sampling": {k: r.unclip[k] for k in ("decoder_steps", "decoder_cfg")}}
        return {**out, "columns": [
            {"id": c.system.id, "name": c.system.name, "pipeline": c.system.path, "note": c.note,
             "files": [f"{c.system.id}/{k:02d}.png" for k in range(len(c.images))],
             "command": sample_command(c.system, r)} for c in self.columns]}


class JobQueue:
    """A bounded FIFO of jobs run one at a time by one worker thread, and the last finished jobs' images.

    `submit` refuses with QueueFull when `max_waiting` jobs wait; finished jobs beyond the newest `keep_jobs`, or
    beyond `keep_bytes` of images, are forgotten (their pages say so), which keeps memory flat under any load.
    """

    def __init__(self, systems: Sequence[System], *, max_waiting: int = 8, keep_jobs: int = 32,
                 keep_bytes: int = 256 * 2**20) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}.")
        self.systems = {s.info.id: s for s in systems}
        self.max_waiting, self.keep_jobs, self.keep_bytes = max_waiting, keep_jobs, keep_bytes
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="argen-serve-worker", daemon=True)
        self.started = time.time()
        self.finished_count = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job and stop the worker."""
        with self._lock:
            self._closed = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel.set()
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: JobRequest) -> Job:
        """Queue a job for `request`; QueueFull when the queue is full."""
        columns, warnings = self._plan(request)
        job = Job(id=secrets.token_hex(8), request=request, columns=columns, warnings=warnings)
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down.")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({len(self._waiting)} jobs waiting and one running); try again in "
                                "a minute.")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._lock.notify_all()
        return job

    def _plan(self, request: JobRequest) -> tuple[list[Column], list[str]]:
        """The job's columns (with a note for any that cannot run it) and the warnings to show with it."""
        columns, warnings = [], []
        if request.edit is not None and request.edit.tool == "variations":  # reads the image, no prompt
            return [Column(self.systems[sid].info) for sid in request.systems], []
        if not request.prompt:
            warnings.append("The empty prompt samples the unconditional model (no caption).")
        for sid in request.systems:
            system = self.systems[sid]
            column = Column(system.info)
            if system.info.family == "unclip" and not request.prompt:
                column.note = "skipped: unCLIP needs a caption (its CLIP embeds it)"
            columns.append(column)
            if request.prompt and (unseen := system.unseen_words(request.prompt)):
                warnings.append(f"{system.info.name}: {', '.join(map(repr, unseen))} never occurred in a training "
                                "caption; the model cannot know what that means and will mostly ignore it.")
            if request.prompt and isinstance(system, GPTSystem):
                have, reads = system.prompt_tokens(request.prompt)
                if have > reads:
                    warnings.append(f"{system.info.name} reads the first {reads} of the prompt's {have} tokens; the "
                                    "rest is cut.")
        return columns, warnings

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        total = sum(j.nbytes() for j in finished)
        while finished and (len(finished) > self.keep_jobs or total > self.keep_bytes):
            old = finished.pop(0)
            total -= old.nbytes()
            del self._jobs[old.id]

    def cancel(self, job_id: str) -> Job | None:
        """Ask the job to stop: a waiting job is dropped at once, a running one at its next network call."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return job
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled", "cancelled before it started")
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job: Job) -> dict[str, Any]:
        """What the page shows of a job; images are named by their URL index, filled in column by column."""
        with self._lock:
            position = self._waiting.index(job) + 1 if job in self._waiting else 0
            return {"id": job.id, "state": job.state, "message": job.message, "warnings": job.warnings,
                    "progress": round(job.progress, 4), "position": position, "prompt": job.request.prompt,
                    "n": job.request.n, "edit": job.request.edit.summary() if job.request.edit is not None else None,
                    "columns": [{"id": c.system.id, "name": c.system.name, "images": len(c.images), "note": c.note,
                                 "seconds": c.seconds} for c in job.columns]}

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"ok": self._thread.is_alive() and not self._closed, "waiting": len(self._waiting),
                    "max_waiting": self.max_waiting, "running": self._running is not None,
                    "jobs_kept": len(self._jobs), "jobs_finished": self.finished_count,
                    "uptime_s": round(time.time() - self.started, 1)}

    def _finish(self, job: Job, state: str, message: str = "") -> None:
        job.state, job.message = state, message
        if state == "done":
            job.progress = 1.0
        self.finished_count += 1
        self._forget_old()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                job.state = "running"
                self._running = job
            try:
                state, message = "done", self._run(job)
            except Cancelled:
                done = sum(1 for c in job.columns if c.images)
                state, message = "cancelled", f"cancelled; {done} of {len(job.columns)} columns had finished"
            except ValueError as err:  # the library's boundary errors: a bad setting, non-finite samples
                state, message = "failed", str(err)
            except Exception as err:  # never a traceback on the page; the server log has it
                log.exception("job %s failed", job.id)
                state, message = "failed", f"internal error ({type(err).__name__}: {err}); the server log has details."
            with self._lock:
                self._running = None
                self._finish(job, state, message)

    def _run(self, job: Job) -> str:
        """Generate every column of `job` in turn (an edit job: edit its one image); returns the job's closing
        message."""
        runnable = [c for c in job.columns if not c.note]
        for i, column in enumerate(runnable):
            if job.cancel.is_set():
                raise Cancelled
            system = self.systems[column.system.id]
            expected, calls = max(system.expected_calls(job.request), 1), 0

            def on_call() -> None:
                nonlocal calls
                if job.cancel.is_set():
                    raise Cancelled
                calls += 1
                job.progress = (i + min(calls / expected, 0.99)) / len(runnable)

            start = time.perf_counter()
            with watch_calls(system.modules(), on_call):
                images = system.generate(job.request) if job.request.edit is None else system.edit(job.request)
            pngs = [png_bytes(im) for im in images]
            with self._lock:
                column.images, column.seconds = pngs, round(time.perf_counter() - start, 3)
                job.progress = (i + 1) / len(runnable)
        return f"{sum(len(c.images) for c in job.columns)} images"

