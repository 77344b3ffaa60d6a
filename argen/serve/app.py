"""The Starlette app of `argen serve`: the page, its JSON API and the downloads (needs the `argen[serve]` extra).

GET  /                                     the page
GET  /api/config                           the form: columns, fields and their defaults
GET  /api/health                           liveness and queue length (answers at once while jobs run)
POST /api/jobs                             queue a job: 202 {id, ...}, 400 {error} for a bad setting, 503 {error} when full
GET  /api/jobs/{id}                        the job's state, progress, warnings and finished columns
POST /api/jobs/{id}/cancel                 cancel it (queued: at once; running: at its next network call)
GET  /api/jobs/{id}/images/{column}/{k}.png  one image
POST /api/jobs/{id}/images/{column}/{k}/inpaint     queue an inpainting of that image (AR GPT columns): as /api/jobs
POST /api/jobs/{id}/images/{column}/{k}/variations  queue variations of that image (unCLIP columns): as /api/jobs
GET  /api/jobs/{id}/images.zip             every image and settings.json (an edit's: also source.png, mask.png)
GET  /api/jobs/{id}/settings.json          the settings, with the `argen sample` (an edit's: `argen edit`) command of
                                           each column
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from argen.serve.jobs import Column, Job, JobQueue, QueueFull
from argen.serve.page import page_html
from argen.serve.settings import Form, JobRequest, SettingsError

MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_S = 30


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _marked(obj: dict[str, Any]) -> bytes:
    """JSON bytes carrying argen's mark first, as argen's JSON outputs do."""
    from tokenizers_img.serialization import JSON_MARK

    return (json.dumps({JSON_MARK[0]: JSON_MARK[1], **obj}, indent=2) + "\n").encode("utf-8")


def create_app(queue: JobQueue, form: Form, *, title: str = "argen") -> Starlette:
    """The app serving `form` and running jobs on `queue`; the queue's worker starts and stops with the app."""

    def job_or_404(request: Request) -> Job | JSONResponse:
        job = queue.get(request.path_params["job_id"])
        if job is None:
            return _error(404, f"no job {request.path_params['job_id']!r}: the server keeps the last {queue.keep_jobs} "
                               "finished jobs, and forgets all of them when it restarts. Generate again.")
        return job

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page_html(title))

    async def config(request: Request) -> JSONResponse:
        return JSONResponse({"title": title, **form.as_json()})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(queue.health())

    def image_or_404(request: Request) -> tuple[Job, Column, int] | JSONResponse:
        """The job, column and index of the image a path names, or a 404 saying what is missing."""
        job = job_or_404(request)
        if isinstance(job, JSONResponse):
            return job
        column = next((c for c in job.columns if c.system.id == request.path_params["column"]), None)
        k = request.path_params["index"]
        if column is None or not 0 <= k < len(column.images):
            return _error(404, f"job {job.id} has no image {k} in column {request.path_params['column']!r} (yet).")
        return job, column, k

    async def json_body(request: Request) -> Any:
        """The request's JSON body ({} when empty), or a 413 / 400 response."""
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return _error(413, f"the request is larger than {MAX_BODY_BYTES} bytes.")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"the request is larger than {MAX_BODY_BYTES} bytes.")
        try:
            return json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON.")

    def queued(parse: Callable[[], JobRequest]) -> JSONResponse:
        """202 with the job of the request `parse()` checks; 400 for a bad setting, 503 when the queue is full."""
        try:
            job = queue.submit(parse())
        except SettingsError as err:
            return _error(400, str(err))
        except QueueFull as err:
            return _error(503, str(err), **{"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(queue.status(job), status_code=202)

    async def submit(request: Request) -> JSONResponse:
        data = await json_body(request)
        if isinstance(data, JSONResponse):
            return data
        return queued(lambda: form.parse(data))

    async def edit(request: Request) -> JSONResponse:
        found = image_or_404(request)
        if isinstance(found, JSONResponse):
            return found
        source, column, k = found
        data = await json_body(request)
        if isinstance(data, JSONResponse):
            return data
        return queued(lambda: form.parse_edit(request.path_params["tool"], data, job=source.id, column=column.system.id,
                                              index=k, image=column.images[k]))

    async def status(request: Request) -> JSONResponse:
        job = job_or_404(request)
        return job if isinstance(job, JSONResponse) else JSONResponse(queue.status(job))

    async def cancel(request: Request) -> JSONResponse:
        job = job_or_404(request)
        if isinstance(job, JSONResponse):
            return job
        queue.cancel(job.id)
        return JSONResponse(queue.status(job))

    async def image(request: Request) -> Response:
        found = image_or_404(request)
        if isinstance(found, JSONResponse):
            return found
        _, column, k = found
        return Response(column.images[k], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def settings(request: Request) -> Response:
        job = job_or_404(request)
        if isinstance(job, JSONResponse):
            return job
        return Response(_marked(job.settings()), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="argen_{job.id}.json"'})

    async def archive(request: Request) -> Response:
        job = job_or_404(request)
        if isinstance(job, JSONResponse):
            return job
        data = await run_in_threadpool(_zip, job)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="argen_{job.id}.zip"'})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        queue.start()
        try:
            yield
        finally:
            await run_in_threadpool(queue.close)

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/health", health),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", status),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/images/{column}/{index:int}.png", image),
        Route("/api/jobs/{job_id}/images/{column}/{index:int}/{tool}", edit, methods=["POST"]),
        Route("/api/jobs/{job_id}/images.zip", archive),
        Route("/api/jobs/{job_id}/settings.json", settings),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _zip(job: Job) -> bytes:
    """The job's images as COLUMN/NN.png and its settings.json, in one zip (PNGs are stored, not recompressed); an
    edit's source image and mask as source.png and mask.png, which its settings' command reads."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("settings.json", _marked(job.settings()), compress_type=zipfile.ZIP_DEFLATED)
        if (edit := job.request.edit) is not None:
            z.writestr("source.png", edit.image)
            if edit.region is not None:
                z.writestr("mask.png", edit.mask_png())
        for column in job.columns:
            for k, png in enumerate(column.images):
                z.writestr(f"{column.system.id}/{k:02d}.png", png)
    return buf.getvalue()
