"""`argen serve`: the settings form, the job queue (order, refusal when full, cancel), the HTTP API on a tiny trained
pipeline (its images are `argen sample`'s; its edits are `argen edit`'s), the CLI without the extra, and the page driven
in headless Chromium (generating, inpainting a mask drawn with the mouse, variations)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shlex
import shutil
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image
from test_compare import stack  # noqa: F401  (module-scoped: a tiny unCLIP stack trained through argen train)
from test_gpt_task import CAPTIONS
from test_pipeline import trained  # noqa: F401  (module-scoped: a tiny GPT trained through argen train gpt)
from torch import nn

from argen.cli import build_parser, main
from argen.cli.sample import sampler_overrides
from argen.data.transforms import pil_to_tensor
from argen.pipeline import recommended_sampling
from argen.sample import SamplingConfig
from argen.serve.jobs import JobQueue, QueueFull, load_systems, watch_calls
from argen.serve.settings import (
    MAX_IMAGES,
    Form,
    JobRequest,
    SettingsError,
    SystemInfo,
    _field_kind,
    sample_command,
)

GPT_INFO = SystemInfo("gpt", "AR token GPT", "gpt", "/pipe", resolution=16, grid=4)
UNCLIP_INFO = SystemInfo("unclip-ar", "unCLIP, AR prior", "unclip", "/unclip", resolution=32)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


# ----------------------------------------------------------------------------------------------- the form
def test_the_form_shows_every_sampler_field_prefilled_and_parses_the_page_strings():
    form = Form([GPT_INFO], defaults=recommended_sampling({}))
    assert [f.name for f in form.gpt] == [f.name for f in dataclasses.fields(SamplingConfig)]  # a new field shows up
    shown = {f.name: f.default for f in form.gpt}
    assert shown["cfg_scale"] == 2.0 and shown["temperature"] == 1.0 and shown["top_k"] is None
    assert form.unclip == [] and json.dumps(form.as_json())

    r = form.parse({"prompt": "  a red circle ", "n": "3", "seed": "7",
                    "gpt": {"top_k": "", "top_p": "0.9", "cfg_scale": "1.5", "cfg_schedule": "linear"}})
    assert (r.prompt, r.n, r.seed, r.systems) == ("a red circle", 3, 7, ("gpt",))
    assert r.sampling == dataclasses.replace(recommended_sampling({}), top_k=None, top_p=0.9, cfg_scale=1.5,
                                             cfg_schedule="linear")
    assert form.parse({"prompt": ""}).prompt == ""  # the unconditional model


def test_field_kinds_follow_the_dataclass_annotations():
    assert _field_kind(float) == ("float", False, ())
    assert _field_kind(int | None) == ("int", True, ())
    assert _field_kind(bool) == ("bool", False, ())
    assert _field_kind(Literal["a", "b"]) == ("choice", False, ("a", "b"))
    assert _field_kind(list[int]) is None and _field_kind(int | str | None) is None


@pytest.mark.parametrize("data, says", [
    ({"n": 500}, f"[1, {MAX_IMAGES}], got 500"),
    ({"n": "2.5"}, "number of images must be an integer"),
    ({"n": 2.5}, "number of images must be an integer"),
    ({"seed": -1}, "seed must be an integer in [0,"),
    ({"gpt": {"temperature": "-1"}}, "temperature must be a number in [0, 100], got '-1'"),
    ({"gpt": {"temperature": "0.00001"}}, "temperature must be 0 (greedy) or in [0.0001, 100], got 1e-05"),
    ({"gpt": {"top_p": "nan"}}, "top-p must be a number in [0, 1]"),
    ({"gpt": {"cfg_scale": ""}}, "CFG scale is empty"),
    ({"gpt": {"cfg_schedule": "cubic"}}, "CFG schedule must be one of constant, linear, got 'cubic'"),
    ({"gpt": {"bogus": 1}}, "unknown GPT setting(s) ['bogus']"),
    ({"gpt": [1]}, "GPT settings must be a JSON object"),
    ({"systems": ["x"]}, "unknown column(s) ['x']"),
    ({"systems": []}, "choose at least one model"),
    ({"prompt": 3}, "the prompt must be text"),
    ({"prompt": "x" * 1001}, "at most 1000"),
    ({"prompt": "a \ud800 circle"}, "lone surrogate"),
])
def test_a_bad_setting_is_refused_with_a_message_that_names_it(data, says):
    with pytest.raises(SettingsError) as err:
        Form([GPT_INFO], defaults=recommended_sampling({})).parse({"prompt": "a red circle", **data})
    assert says in str(err.value)


def test_a_non_object_request_is_refused():
    with pytest.raises(SettingsError, match="JSON object"):
        Form([GPT_INFO], defaults=SamplingConfig()).parse(["a red circle"])


def test_the_settings_command_is_an_argen_sample_command_with_the_same_settings():
    sampling = SamplingConfig(cfg_scale=3.0, top_k=8, decoding="jacobi", window=4)
    request = JobRequest(prompt="a red circle's", n=3, seed=5, sampling=sampling, unclip={}, systems=("gpt",))
    args = build_parser().parse_args(shlex.split(sample_command(GPT_INFO, request))[1:])
    assert (args.pipeline, args.prompts, args.num, args.seed) == ("/pipe", ["a red circle's"], 3, 5)
    # every field is given (top-p off as --top-p 1), so what the pipeline recommends fills none of them in
    recommended = SamplingConfig(temperature=0.5, top_k=99, top_p=0.5, cfg_scale=7.0, cfg_schedule="linear")
    assert dataclasses.replace(recommended, **sampler_overrides(args)) == sampling


# ----------------------------------------------------------------------------------------------- edit requests
def mask_url(mask: np.ndarray) -> str:
    """A uint8 (H, W) mask (255 = regenerate) as the page sends it: a PNG data: URL."""
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


STROKE = np.zeros((16, 16), np.uint8)
STROKE[5:8, 5:10] = 255  # 15 px across two 4x4 codes: code row 1, code columns 1-2
SNAPPED = np.zeros((16, 16), bool)
SNAPPED[4:8, 4:12] = True


def _parse_edit(tool: str, data: dict, column: str = "gpt") -> JobRequest:
    form = Form([GPT_INFO, UNCLIP_INFO], defaults=recommended_sampling({}))
    return form.parse_edit(tool, data, job="0123", column=column, index=1, image=b"png")


def test_an_inpaint_request_snaps_the_drawn_mask_outward_to_the_code_grid():
    r = _parse_edit("inpaint", {"prompt": " a blue square ", "mask": mask_url(STROKE), "n": "3", "seed": 2,
                                "gpt": {"top_k": "8"}})
    assert (r.prompt, r.n, r.seed, r.systems, r.sampling.top_k) == ("a blue square", 3, 2, ("gpt",), 8)
    e = r.edit
    assert (e.tool, e.job, e.column, e.index, e.image) == ("inpaint", "0123", "gpt", 1, b"png")
    assert e.mask_box() == [5, 5, 10, 8] and torch.equal(e.region.pixels[0], torch.from_numpy(SNAPPED))
    assert e.summary()["region"] == ("regenerating 2 of 16 codes (code rows 1-1, columns 1-2; 4x4 px each): 32 px, 17 "
                                     "of them outside the mask given (snapped outward to the code grid)")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(e.mask_png()))), STROKE)  # the zip's mask.png: as drawn
    record = e.record()
    assert record["cells"][1] == [0, 1, 1, 0] and record["pixels_requested"] == 15 and record["config"]["method"] == "resample"
    boxed = _parse_edit("inpaint", {"box": [5, 5, 10, 8]})
    assert torch.equal(boxed.edit.region.pixels, e.region.pixels) and boxed.prompt == ""
    v = _parse_edit("variations", {"n": 2, "unclip": {"decoder_steps": "3"}}, column="unclip-ar")
    assert (v.edit.tool, v.n, v.unclip["decoder_steps"], v.edit.region) == ("variations", 2, 3, None)


EMPTY = mask_url(np.zeros((16, 16), np.uint8))


@pytest.mark.parametrize("tool, column, data, says", [
    ("inpaint", "gpt", {"mask": EMPTY}, "the mask is empty: paint over the part of the image to regenerate"),
    ("inpaint", "gpt", {"mask": mask_url(np.full((32, 32), 255, np.uint8))}, "the mask is 32x32 px, but the image is 16x16"),
    ("inpaint", "gpt", {"mask": "data:image/png;base64,bm90IGEgcG5n"}, "the mask is not a PNG image in base64"),
    ("inpaint", "gpt", {"mask": "%%%"}, "the mask is not a PNG image in base64"),
    ("inpaint", "gpt", {"mask": 3}, "the mask must be a PNG image as a data: URL or base64 text, got int"),
    ("inpaint", "gpt", {}, "give exactly one of a mask (a PNG image, white = regenerate) and a box"),
    ("inpaint", "gpt", {"mask": EMPTY, "box": [0, 0, 4, 4]}, "give exactly one of a mask"),
    ("inpaint", "gpt", {"box": [4, 4, 2, 8]}, "box (x0, y0, x1, y1) = (4, 4, 2, 8) must satisfy 0 <= x0 < x1 <= 16"),
    ("inpaint", "gpt", {"box": [0, 0, 4]}, "a box is (x0, y0, x1, y1), got 3 numbers"),
    ("inpaint", "gpt", {"box": "0,0,4,4"}, "the box must be a list of four numbers [x0, y0, x1, y1]"),
    ("inpaint", "gpt", {"box": [0, 0, 4, 4], "n": 0}, "number of images must be an integer in [1, 64], got 0"),
    ("inpaint", "gpt", {"box": [0, 0, 4, 4], "gpt": {"temperature": "-1"}}, "GPT temperature must be a number"),
    ("inpaint", "gpt", {"box": [0, 0, 4, 4], "prompt": 5}, "the prompt must be text, got int"),
    ("inpaint", "gpt", {"box": [0, 0, 4, 4], "strength": 1}, "unknown inpaint setting(s) ['strength']"),
    ("inpaint", "unclip-ar", {"box": [0, 0, 4, 4]}, "inpaint edits images of the AR token GPT columns (gpt); "
                                                     "'unclip-ar' is not one."),
    ("variations", "gpt", {}, "variations edits images of the unCLIP columns (unclip-ar); 'gpt' is not one."),
    ("variations", "unclip-ar", {"unclip": {"decoder_steps": 0}}, "unCLIP decoder steps must be an integer in [1, 200], got 0"),
    ("variations", "unclip-ar", {"prompt": "a"}, "unknown variations setting(s) ['prompt']"),
    ("variations", "unclip-ar", [2], "the variations request must be a JSON object"),
    ("outpaint", "gpt", {}, "unknown edit 'outpaint'; this server has ['inpaint', 'variations']"),
])
def test_a_bad_edit_request_is_refused_with_a_message_that_names_it(tool, column, data, says):
    with pytest.raises(SettingsError) as err:
        _parse_edit(tool, data, column=column)
    assert says in str(err.value)


# ----------------------------------------------------------------------------------------------- the queue
class FakeSystem:
    """A column without a model: `steps` calls of a watched module, each after taking a permit from `gate` if given."""

    def __init__(self, sid: str = "gpt", *, family: str = "gpt", steps: int = 4, gate: threading.Semaphore | None = None,
                 fail: Exception | None = None) -> None:
        self.info = SystemInfo(sid, sid, family, "/fake")
        self.net, self.steps, self.gate, self.fail = nn.Identity(), steps, gate, fail
        self.calls = 0

    def modules(self) -> list[nn.Module]:
        return [self.net]

    def expected_calls(self, request: JobRequest) -> int:
        return self.steps

    def generate(self, request: JobRequest) -> torch.Tensor:
        for _ in range(self.steps):
            if self.gate is not None:
                assert self.gate.acquire(timeout=10)
            self.net(torch.zeros(1))
            self.calls += 1
        if self.fail is not None:
            raise self.fail
        return torch.linspace(-1, 1, request.n * 3 * 4 * 4).reshape(request.n, 3, 4, 4)

    def unseen_words(self, prompt: str) -> list[str]:
        return [w for w in prompt.split() if w == "zebra"]


def _request(prompt: str = "a red circle", n: int = 2, systems: tuple[str, ...] = ("gpt",)) -> JobRequest:
    return JobRequest(prompt=prompt, n=n, seed=0, sampling=SamplingConfig(), unclip={}, systems=systems)


def _wait(queue: JobQueue, job, states=("done", "cancelled", "failed"), timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = queue.status(job)
        if status["state"] in states:
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job.id} still {queue.status(job)['state']} after {timeout} s")


def test_jobs_run_in_order_a_full_queue_refuses_and_cancel_stops_them():
    gate = threading.Semaphore(0)
    system = FakeSystem(steps=50, gate=gate)
    queue = JobQueue([system], max_waiting=2)
    queue.start()
    try:
        running = queue.submit(_request())
        _wait(queue, running, states=("running",))
        second, third = queue.submit(_request()), queue.submit(_request(n=3))
        assert queue.status(third)["position"] == 2
        with pytest.raises(QueueFull, match="queue is full"):
            queue.submit(_request())
        queue.cancel(second.id)  # waiting: dropped at once
        assert queue.status(second)["state"] == "cancelled" and queue.status(third)["position"] == 1
        gate.release(3)
        while system.calls < 3:
            time.sleep(0.01)
        queue.cancel(running.id)  # running: stops at its next network call
        gate.release(1000)
        assert _wait(queue, running)["message"] == "cancelled; 0 of 1 columns had finished"
        assert running.progress == pytest.approx(3 / 50)
        done = _wait(queue, third)
        assert system.calls == 3 + 50  # the cancelled job's 3, the third job's 50
        assert done["state"] == "done" and done["columns"][0]["images"] == 3 and done["progress"] == 1
        png = Image.open(io.BytesIO(third.columns[0].images[0]))
        assert png.size == (4, 4) and png.info["Software"] == "argen"
        assert queue.health()["waiting"] == 0 and queue.health()["jobs_finished"] == 3
    finally:
        gate.release(1000)
        queue.close()


def test_failures_are_messages_and_old_jobs_are_forgotten():
    queue = JobQueue([FakeSystem(fail=ValueError("cfg_scale must be in [0, 1000], got 5000.")),
                      FakeSystem("boom", fail=RuntimeError("kaput")), FakeSystem("ok")], keep_jobs=2)
    queue.start()
    try:
        bad = _wait(queue, queue.submit(_request(systems=("gpt",))))
        assert bad["state"] == "failed" and bad["message"] == "cfg_scale must be in [0, 1000], got 5000."
        crash = _wait(queue, queue.submit(_request(systems=("boom",))))
        assert crash["state"] == "failed" and crash["message"].startswith("internal error (RuntimeError: kaput)")
        first = queue.submit(_request(systems=("ok",)))
        _wait(queue, first)
        assert queue.get(first.id) is not None
        for _ in range(2):
            _wait(queue, queue.submit(_request(systems=("ok",))))
        assert queue.get(first.id) is None and queue.health()["jobs_kept"] == 2
    finally:
        queue.close()


def test_the_empty_prompt_is_unconditional_and_skips_unclip_and_unseen_words_warn():
    queue = JobQueue([FakeSystem(), FakeSystem("unclip-ar", family="unclip")])
    queue.start()
    try:
        job = queue.submit(_request(prompt="", systems=("gpt", "unclip-ar")))
        status = _wait(queue, job)
        assert status["warnings"] == ["The empty prompt samples the unconditional model (no caption)."]
        assert [c["images"] for c in status["columns"]] == [2, 0] and "unCLIP needs a caption" in status["columns"][1]["note"]
        warned = queue.submit(_request(prompt="a zebra", systems=("gpt",)))
        assert warned.warnings == ["gpt: 'zebra' never occurred in a training caption; the model cannot know what that "
                                   "means and will mostly ignore it."]
    finally:
        queue.close()


# ----------------------------------------------------------------------------------------------- the HTTP API
@pytest.fixture(scope="module")
def gpt_systems(trained):  # noqa: F811
    return load_systems(str(trained.final), None)


@pytest.fixture(scope="module")
def both_systems(gpt_systems, stack):  # noqa: F811
    """The tiny GPT and each prior of the tiny unCLIP pipeline: four columns."""
    return gpt_systems + load_systems(None, str(stack["pipe"]))


def _client(systems, **queue_options):
    from starlette.testclient import TestClient

    from argen.serve.app import create_app

    form = Form([s.info for s in systems], defaults=recommended_sampling({}))
    return TestClient(create_app(JobQueue(systems, **queue_options), form))


def _poll(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["state"] in ("done", "cancelled", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_the_api_makes_the_images_argen_sample_makes(gpt_systems):
    pytest.importorskip("starlette")
    from argen.data.transforms import tensor_to_pil

    pipe = gpt_systems[0].pipe
    with _client(gpt_systems) as client:
        assert "<textarea id=\"prompt\"" in client.get("/").text
        fields = client.get("/api/config").json()["fields"]["gpt"]
        assert {f["name"]: f["default"] for f in fields}["cfg_scale"] == 2.0
        started = client.post("/api/jobs", json={"prompt": CAPTIONS[0], "n": 3, "seed": 5,
                                                 "gpt": {"cfg_scale": "3", "top_k": "8"}})
        assert started.status_code == 202
        status = _poll(client, started.json()["id"])
        assert status["state"] == "done" and status["columns"][0]["images"] == 3
        want = pipe.generate(CAPTIONS[0], n_per_prompt=3, sampling=SamplingConfig(cfg_scale=3.0, top_k=8), seed=5)
        for k in range(3):
            response = client.get(f"/api/jobs/{status['id']}/images/gpt/{k}.png")
            assert response.headers["content-type"] == "image/png"
            got = Image.open(io.BytesIO(response.content))
            assert got.size == (16, 16) and got.tobytes() == tensor_to_pil(want.images[k]).tobytes()
        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/jobs/{status['id']}/images.zip").content))
        assert sorted(archive.namelist()) == ["gpt/00.png", "gpt/01.png", "gpt/02.png", "settings.json"]
        settings = json.loads(archive.read("settings.json"))
        assert settings["written_by"] == "argen" and settings["gpt_sampling"]["top_k"] == 8
        args = build_parser().parse_args(shlex.split(settings["columns"][0]["command"])[1:])
        assert (args.prompts, args.num, args.seed, args.cfg, args.top_k) == ([CAPTIONS[0]], 3, 5, 3.0, 8)
        assert client.get(f"/api/jobs/{status['id']}/settings.json").json()["seed"] == 5


def test_the_gpt_and_each_unclip_prior_side_by_side_on_one_prompt_and_seed(both_systems):
    pytest.importorskip("starlette")
    fast = {"prior_steps": "3", "decoder_steps": "2", "decoder_cfg": "2", "prior_cfg": "1"}
    with _client(both_systems) as client:
        config = client.get("/api/config").json()
        ids = [s["id"] for s in config["systems"]]
        assert ids == ["gpt", "unclip-diffusion", "unclip-ar", "unclip-none"]
        assert [f["name"] for f in config["fields"]["unclip"]] == ["prior_steps", "prior_cfg", "decoder_steps", "decoder_cfg"]
        job = client.post("/api/jobs", json={"prompt": CAPTIONS[0], "n": 2, "seed": 3, "unclip": fast}).json()
        status = _poll(client, job["id"])
        assert status["state"] == "done" and [c["images"] for c in status["columns"]] == [2, 2, 2, 2]
        settings = client.get(f"/api/jobs/{job['id']}/settings.json").json()
        for system, column in zip(both_systems[1:], settings["columns"][1:]):
            request = JobRequest(prompt=CAPTIONS[0], n=2, seed=3, sampling=SamplingConfig(), systems=(system.info.id,),
                                 unclip={k: float(v) if "cfg" in k else int(v) for k, v in fast.items()})
            want = system.pipe.generate(CAPTIONS[0], n_per_prompt=2, seed=3, sampling=system.sampling(request))
            for k in range(2):
                png = client.get(f"/api/jobs/{job['id']}/images/{system.info.id}/{k}.png").content
                got = pil_to_tensor(Image.open(io.BytesIO(png)))
                assert got.shape == (3, 32, 32) and (got - want.images[k]).abs().max() <= 1 / 127.5 + 1e-6
            args = build_parser().parse_args(shlex.split(column["command"])[1:])
            assert (args.prior, args.prior_steps, args.decoder_steps, args.cfg, args.prior_cfg) == (
                system.prior, 3, 2, 2.0, 1.0)


def _png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_inpainting_keeps_the_pixels_outside_the_snapped_mask_and_its_download_remakes_it(gpt_systems, tmp_path,
                                                                                          monkeypatch):
    pytest.importorskip("starlette")

    system = gpt_systems[0]
    with _client(gpt_systems) as client:
        source_job = client.post("/api/jobs", json={"prompt": CAPTIONS[0], "n": 2, "seed": 1}).json()
        assert _poll(client, source_job["id"])["state"] == "done"
        source_png = client.get(f"/api/jobs/{source_job['id']}/images/gpt/1.png").content
        started = client.post(f"/api/jobs/{source_job['id']}/images/gpt/1/inpaint",
                              json={"prompt": CAPTIONS[1], "mask": mask_url(STROKE), "n": 3, "seed": 4, "gpt": {"top_k": "8"}})
        assert started.status_code == 202
        report = started.json()["edit"]
        assert (report["tool"], report["job"], report["index"], report["mask_box"]) == ("inpaint", source_job["id"], 1,
                                                                                        [5, 5, 10, 8])
        assert report["region"].startswith("regenerating 2 of 16 codes (code rows 1-1, columns 1-2")
        status = _poll(client, started.json()["id"])
        assert status["state"] == "done" and [c["images"] for c in status["columns"]] == [3]
        got = [_png_array(client.get(f"/api/jobs/{status['id']}/images/gpt/{k}.png").content) for k in range(3)]
        source = _png_array(source_png)
        for image in got:
            assert image.shape == (16, 16, 3) and np.array_equal(image[~SNAPPED], source[~SNAPPED])  # kept exactly
        assert any(not np.array_equal(image[SNAPPED], source[SNAPPED]) for image in got)  # the region was redrawn
        sampling = dataclasses.replace(recommended_sampling({}), top_k=8)
        want = system.pipe.inpaint(Image.open(io.BytesIO(source_png)), CAPTIONS[1], mask=Image.fromarray(STROKE), n=3,
                                   sampling=sampling, seed=4)
        assert all(np.array_equal(np.asarray(w), g) for w, g in zip(want, got))  # the page's images are the library's

        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/jobs/{status['id']}/images.zip").content))
        assert sorted(archive.namelist()) == ["gpt/00.png", "gpt/01.png", "gpt/02.png", "mask.png", "settings.json",
                                              "source.png"]
        settings = json.loads(archive.read("settings.json"))
        assert settings["edit"]["source"] == {"job": source_job["id"], "column": "gpt", "index": 1, "file": "source.png"}
        assert (settings["prompt"], settings["seed"], settings["edit"]["mask_box"], settings["edit"]["cells"][1]) == (
            CAPTIONS[1], 4, [5, 5, 10, 8], [0, 1, 1, 0])
        assert archive.read("source.png") == source_png and np.array_equal(_png_array(archive.read("mask.png"))[..., 0], STROKE)
        # the settings' command, run where the zip is unpacked, makes the same images
        archive.extractall(tmp_path)
        monkeypatch.chdir(tmp_path)
        assert main(shlex.split(settings["columns"][0]["command"])[1:] + ["-o", "again.png"]) == 0
        for k, image in enumerate(got):
            assert np.array_equal(_png_array((tmp_path / "again_images" / f"{k:03d}.png").read_bytes()), image)

    # the progress bar expects as many network calls (cancel points) as the hooks see
    form = Form([system.info], defaults=recommended_sampling({}))
    request = form.parse_edit("inpaint", {"prompt": CAPTIONS[1], "mask": mask_url(STROKE), "n": 3}, job="j", column="gpt",
                              index=1, image=source_png)
    calls = []
    with watch_calls(system.modules(), lambda: calls.append(1)):
        system.edit(request)
    assert len(calls) == system.expected_calls(request) > 0


def test_an_edit_of_a_missing_image_or_with_an_empty_mask_gets_a_message(gpt_systems):
    pytest.importorskip("starlette")
    with _client(gpt_systems) as client:
        job = client.post("/api/jobs", json={"prompt": CAPTIONS[0], "n": 1}).json()
        _poll(client, job["id"])
        empty = client.post(f"/api/jobs/{job['id']}/images/gpt/0/inpaint", json={"prompt": "a", "mask": EMPTY})
        assert empty.status_code == 400
        assert empty.json()["error"] == ("the mask is empty: paint over the part of the image to regenerate (white in a "
                                         "mask image), then inpaint.")
        missing = client.post(f"/api/jobs/{job['id']}/images/gpt/5/inpaint", json={"box": [0, 0, 4, 4]})
        assert missing.status_code == 404 and missing.json()["error"] == f"job {job['id']} has no image 5 in column 'gpt' (yet)."
        gone = client.post("/api/jobs/0123456789abcdef/images/gpt/0/inpaint", json={"box": [0, 0, 4, 4]})
        assert gone.status_code == 404 and "keeps the last 32" in gone.json()["error"]
        bad = client.post(f"/api/jobs/{job['id']}/images/gpt/0/inpaint", content=b"{", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"] == "the request body is not JSON."
        other = client.post(f"/api/jobs/{job['id']}/images/gpt/0/sketch", json={})
        assert other.status_code == 400 and "unknown edit 'sketch'" in other.json()["error"]


def test_variations_of_a_unclip_image_are_decodings_of_its_image_embedding(both_systems):
    pytest.importorskip("starlette")
    from argen.unclip import controls
    from argen.unclip.pipeline import DecoderSampling

    system = next(s for s in both_systems if s.info.id == "unclip-none")
    with _client(both_systems) as client:
        source_job = client.post("/api/jobs", json={"prompt": CAPTIONS[0], "n": 1, "systems": ["unclip-none"],
                                                    "unclip": {"decoder_steps": "2"}}).json()
        assert _poll(client, source_job["id"])["state"] == "done"
        png = client.get(f"/api/jobs/{source_job['id']}/images/unclip-none/0.png").content
        started = client.post(f"/api/jobs/{source_job['id']}/images/unclip-none/0/variations",
                              json={"n": 3, "seed": 2, "unclip": {"decoder_steps": "2"}})
        assert started.status_code == 202
        assert started.json()["edit"]["tool"] == "variations" and started.json()["warnings"] == []
        status = _poll(client, started.json()["id"])
        assert status["state"] == "done" and [c["images"] for c in status["columns"]] == [3]
        want = controls.variations(system.pipe, Image.open(io.BytesIO(png)), n=3, seed=2,
                                   decoder=DecoderSampling(steps=2, cfg_scale=2.0))
        for k in range(3):
            got = pil_to_tensor(Image.open(io.BytesIO(client.get(f"/api/jobs/{status['id']}/images/unclip-none/{k}.png").content)))
            assert got.shape == (3, 32, 32) and (got - want.images[k]).abs().max() <= 1 / 127.5 + 1e-6
        settings = client.get(f"/api/jobs/{status['id']}/settings.json").json()
        assert settings["edit"]["source"]["column"] == "unclip-none" and "prompt" not in settings
        assert settings["decoder_sampling"] == {"decoder_steps": 2, "decoder_cfg": 2.0}
        args = build_parser().parse_args(shlex.split(settings["columns"][0]["command"])[1:])
        assert (args.edit_command, args.pipeline, args.image, args.num, args.seed, args.decoder_steps, args.cfg) == (
            "variations", system.info.path, "source.png", 3, 2, 2, 2.0)
        refused = client.post(f"/api/jobs/{source_job['id']}/images/unclip-none/0/inpaint", json={"box": [0, 0, 8, 8]})
        assert refused.status_code == 400 and refused.json()["error"].startswith("inpaint edits images of the AR token GPT")
    request = Form([system.info], defaults=recommended_sampling({})).parse_edit(
        "variations", {"n": 3, "unclip": {"decoder_steps": "2"}}, job="j", column="unclip-none", index=0, image=png)
    calls = []
    with watch_calls(system.modules(), lambda: calls.append(1)):
        system.edit(request)
    assert len(calls) == system.expected_calls(request) == 2


def test_bad_input_gets_a_message_never_a_traceback(gpt_systems):
    pytest.importorskip("starlette")
    pipe = gpt_systems[0].pipe
    with _client(gpt_systems) as client:
        for body, says in (({"prompt": "a", "n": 1000}, "[1, 64], got 1000"),
                           ({"prompt": "a", "gpt": {"temperature": "hot"}}, "temperature must be a number")):
            response = client.post("/api/jobs", json=body)
            assert response.status_code == 400 and says in response.json()["error"]
        response = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"] == "the request body is not JSON."
        missing = client.get("/api/jobs/0123456789abcdef")
        assert missing.status_code == 404 and "keeps the last 32" in missing.json()["error"]
        unseen = pipe.unseen_words("a red zebra")
        assert unseen  # the tiny tokenizer's training captions never held "zebra"
        job = client.post("/api/jobs", json={"prompt": "a red zebra", "n": 1}).json()
        assert any(repr(unseen[0]) in w for w in job["warnings"])
        _poll(client, job["id"])


def test_a_full_queue_answers_503_with_a_reason_and_health_answers_while_a_job_runs():
    pytest.importorskip("starlette")
    gate = threading.Semaphore(0)
    with _client([FakeSystem(steps=5, gate=gate)], max_waiting=1) as client:
        try:
            first = client.post("/api/jobs", json={"prompt": "a", "n": 1}).json()
            while client.get(f"/api/jobs/{first['id']}").json()["state"] != "running":
                time.sleep(0.01)
            assert client.post("/api/jobs", json={"prompt": "b", "n": 1}).status_code == 202
            refused = client.post("/api/jobs", json={"prompt": "c", "n": 1})
            assert refused.status_code == 503 and "queue is full" in refused.json()["error"]
            assert refused.headers["retry-after"] == "30"
            health = client.get("/api/health").json()
            assert health["ok"] and health["running"] and health["waiting"] == 1
            cancelled = client.post(f"/api/jobs/{first['id']}/cancel").json()
            assert cancelled["id"] == first["id"]
        finally:
            gate.release(1000)
        assert _poll(client, first["id"])["state"] == "cancelled"


# ----------------------------------------------------------------------------------------------- the CLI
def test_serve_without_the_extra_is_one_line_naming_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "starlette", None)  # import starlette now raises ImportError
    assert main(["serve", "--pipeline", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "argen serve: error: the web page needs the serve extra: pip install 'argen[serve]'"


def test_serve_refuses_a_busy_port_and_a_host_that_does_not_resolve(capsys):
    pytest.importorskip("starlette")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--pipeline", "nowhere", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--pipeline", "nowhere", "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' does not resolve" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the browser
@pytest.fixture
def live_server(both_systems):
    """The app on a free loopback port, served by uvicorn in a thread; yields its URL."""
    pytest.importorskip("uvicorn")
    import uvicorn

    from argen.cli.serve import listen
    from argen.serve.app import create_app

    form = Form([s.info for s in both_systems], defaults=recommended_sampling({}))
    server = uvicorn.Server(uvicorn.Config(create_app(JobQueue(both_systems), form), log_level="warning"))
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)


def chromium(tmp_path: Path):
    """Headless Chromium from Debian's packages under chromedriver (flags for root and a closed network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


needs_chromium = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                           "chromium-driver; .ci/run installs them)")

# the page's images in each column as drawn: loaded, natural size, and how many distinct colours each holds
IMAGE_STATS_JS = """
const stats = [];
for (const column of document.querySelectorAll('#results .column')) stats.push([column.dataset.system,
    Array.from(column.querySelectorAll('img')).map((img) => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data, colours = new Set();
  for (let i = 0; i < d.length; i += 4) colours.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
  return [img.complete, img.naturalWidth, img.naturalHeight, colours.size];
})]);
return stats;  // pairs, in the page's order (chromedriver sorts an object's keys)"""


@needs_chromium
def test_the_page_in_chromium_generates_images_and_shows_a_bad_setting(live_server, tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(live_server)
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ready")
        assert driver.find_element(By.ID, "uncond").is_displayed()  # the empty prompt is labelled unconditional
        driver.find_element(By.ID, "prompt").send_keys(CAPTIONS[1])
        assert not driver.find_element(By.ID, "uncond").is_displayed()
        n = driver.find_element(By.ID, "job-n")
        n.clear()
        n.send_keys("5")
        for name, value in (("unclip-prior_steps", "3"), ("unclip-decoder_steps", "2")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done")
        loaded = lambda d: all(s[0] for _, images in d.execute_script(IMAGE_STATS_JS) for s in images)
        wait.until(loaded)
        stats = dict(driver.execute_script(IMAGE_STATS_JS))
        assert list(stats) == ["gpt", "unclip-diffusion", "unclip-ar", "unclip-none"]  # side by side, in this order
        sizes = {"gpt": 16, "unclip-diffusion": 32, "unclip-ar": 32, "unclip-none": 32}
        for column, images in stats.items():
            assert [s[1:3] for s in images] == [[sizes[column]] * 2] * 5, column
            assert all(s[3] > 1 for s in images), f"blank images in {column}: {images}"  # more than one colour
        assert driver.find_element(By.ID, "message").get_attribute("hidden") is not None  # no error shown
        assert driver.find_element(By.ID, "zip").get_attribute("href").endswith("/images.zip")
        driver.save_screenshot(str(tmp_path / "page.png"))

        temperature = driver.find_element(By.ID, "gpt-temperature")
        temperature.clear()
        temperature.send_keys("500")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "refused")
        message = driver.find_element(By.ID, "message")
        assert message.is_displayed()
        assert message.text == "GPT temperature must be a number in [0, 100], got '500'."
        assert "Traceback" not in driver.page_source
    finally:
        driver.quit()


def _fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@needs_chromium
def test_the_page_in_chromium_makes_variations_and_inpaints_a_mask_drawn_with_the_mouse(live_server, tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        wait = WebDriverWait(driver, 60)
        state = lambda d: d.find_element(By.ID, "status").get_attribute("data-state")
        loaded = lambda d: all(s[0] for _, images in d.execute_script(IMAGE_STATS_JS) for s in images)
        shown_job = lambda d: d.find_element(By.ID, "zip").get_attribute("href").split("/")[-2]
        # a new job is done when the page shows its downloads (the state says "done" for the last job until then)
        done_after = lambda job: lambda d: state(d) == "done" and shown_job(d) != job and loaded(d)
        driver.get(live_server)
        wait.until(lambda d: state(d) == "ready")
        driver.find_element(By.ID, "prompt").send_keys(CAPTIONS[0])
        for name, value in (("job-n", "3"), ("unclip-decoder_steps", "2")):
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
        for column in ("unclip-diffusion", "unclip-ar"):  # the GPT and unCLIP without a prior are enough here
            driver.find_element(By.ID, f"system-{column}").click()
        driver.find_element(By.ID, "generate").click()
        wait.until(done_after(""))
        first_job = shown_job(driver)

        # the editor opens on the GPT's second image with the job's prompt, and stays open while other jobs run
        driver.find_element(By.CSS_SELECTOR, '#column-gpt figure[data-index="1"] button.tool').click()
        assert driver.find_element(By.ID, "editor").is_displayed()
        assert driver.find_element(By.ID, "editor-prompt").get_attribute("value") == CAPTIONS[0]
        assert driver.find_element(By.ID, "editor-count").text == "nothing marked yet"

        # variations of the unCLIP image: three more of it, 32 px, in its column
        button = driver.find_element(By.CSS_SELECTOR, '#column-unclip-none figure[data-index="0"] button.tool')
        assert button.text == "Variations"
        button.click()
        wait.until(done_after(first_job))
        variations_job = shown_job(driver)
        stats = dict(driver.execute_script(IMAGE_STATS_JS))
        assert list(stats) == ["unclip-none"] and [s[1:3] for s in stats["unclip-none"]] == [[32, 32]] * 3
        assert all(s[3] > 1 for s in stats["unclip-none"])
        assert driver.find_element(By.ID, "edit-text").text.startswith("Variations of unCLIP no prior image 1 of job ")

        # an empty mask: the server's message, on the page
        driver.find_element(By.ID, "editor-run").click()
        wait.until(lambda d: state(d) == "refused")
        assert driver.find_element(By.ID, "message").text.startswith("the mask is empty: paint over the part of the image")

        # one stroke with the mouse across the upper middle of the 256 px canvas (offsets from its centre)
        canvas = driver.find_element(By.ID, "editor-mask")
        ActionChains(driver).move_to_element_with_offset(canvas, -60, -70).click_and_hold().move_by_offset(40, 0) \
            .move_by_offset(40, 10).release().perform()
        marked = driver.find_element(By.ID, "editor-count").text
        assert marked.endswith(" of 16 codes marked (4×4 px each)") and marked != "0 of 16 codes marked"
        prompt = driver.find_element(By.ID, "editor-prompt")
        prompt.clear()
        prompt.send_keys(CAPTIONS[1])
        driver.find_element(By.ID, "editor-run").click()
        wait.until(done_after(variations_job))
        stats = dict(driver.execute_script(IMAGE_STATS_JS))
        assert list(stats) == ["gpt"] and [s[1:3] for s in stats["gpt"]] == [[16, 16]] * 3
        assert all(s[3] > 1 for s in stats["gpt"]), stats
        report = driver.find_element(By.ID, "edit-text").text
        codes = marked.split(" ")[0]
        assert report.startswith(f"Inpainting AR token GPT image 2 of job {first_job[:8]}: regenerating {codes} of 16 codes")
        assert driver.find_element(By.ID, "message").get_attribute("hidden") is not None

        # what the server made of the stroke: the source's pixels outside the cells it regenerated
        job_id = shown_job(driver)
        status = json.loads(_fetch(f"{live_server}api/jobs/{job_id}"))
        keep = ~torch.tensor(status["edit"]["cells"], dtype=torch.bool).repeat_interleave(4, 0).repeat_interleave(4, 1)
        source = _png_array(_fetch(f"{live_server}api/jobs/{first_job}/images/gpt/1.png"))
        for k in range(3):
            image = _png_array(_fetch(f"{live_server}api/jobs/{job_id}/images/gpt/{k}.png"))
            assert np.array_equal(image[keep.numpy()], source[keep.numpy()])
        assert "Traceback" not in driver.page_source
        driver.save_screenshot(str(tmp_path / "inpainted.png"))
    finally:
        driver.quit()
