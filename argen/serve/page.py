"""The page of `argen serve`: one HTML document with its CSS and JS inline (no build step, no files to ship)."""

from __future__ import annotations

import html

_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$TITLE</title>
<style>
  [hidden] { display: none !important; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { padding: 10px 18px; background: #263238; color: #eceff1; }
  header h1 { display: inline; font-size: 18px; margin-right: 12px; }
  header span { color: #b0bec5; font-size: 13px; }
  main { display: flex; gap: 18px; padding: 14px 18px; align-items: flex-start; }
  form { flex: 0 0 300px; }
  fieldset { border: 1px solid #ccc; border-radius: 4px; margin: 0 0 10px; padding: 6px 10px 8px; }
  legend { font-weight: 600; }
  label.field { display: grid; grid-template-columns: 120px 1fr; align-items: center; gap: 6px; margin: 3px 0; }
  label.check { display: block; margin: 2px 0; }
  input[type=number], input[type=text], select { width: 100%; box-sizing: border-box; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; }
  #uncond { display: inline-block; background: #fff3cd; border: 1px solid #e0c36a; border-radius: 3px;
            padding: 0 5px; font-size: 12px; margin-left: 6px; }
  button { font: inherit; padding: 5px 14px; margin-right: 6px; }
  #generate { background: #1565c0; color: white; border: 0; border-radius: 3px; }
  #generate:disabled { background: #90a4ae; }
  #output { flex: 1; min-width: 0; }
  #message { padding: 8px 10px; border-radius: 4px; margin-bottom: 8px; background: #fdecea; border: 1px solid #e57373;
             color: #8e1c1c; white-space: pre-wrap; }
  #warnings { margin: 0 0 8px; padding-left: 18px; color: #7a5b00; }
  #status { margin-bottom: 8px; }
  #status progress { width: 240px; vertical-align: middle; }
  #downloads a { margin-right: 12px; }
  #results { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
  .column { background: white; border: 1px solid #ddd; border-radius: 4px; padding: 8px; }
  .column h2 { font-size: 14px; margin: 0 0 6px; }
  .column .note { color: #777; font-size: 12px; }
  .grid { display: grid; grid-template-columns: repeat(var(--per-row, 4), var(--cell, 96px)); gap: 4px; }
  figure { margin: 0; }
  figure img, figure .pending { width: var(--cell, 96px); height: var(--cell, 96px); display: block; image-rendering: pixelated;
                                background: #eceff1; }
  figure .pending { background: repeating-linear-gradient(45deg, #eceff1, #eceff1 6px, #e3e7ea 6px, #e3e7ea 12px); }
  figcaption { font-size: 11px; color: #777; }
  figcaption button { font-size: 11px; padding: 1px 5px; margin: 2px 2px 0 0; }
  #editor { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; background: white; border: 1px solid #ddd;
            border-radius: 4px; padding: 8px; margin-bottom: 10px; }
  #editor h2 { font-size: 14px; margin: 0 0 6px; }
  #canvas-box { position: relative; flex: 0 0 256px; width: 256px; height: 256px; background: #eceff1; }
  #canvas-box img, #canvas-box canvas { position: absolute; left: 0; top: 0; width: 256px; height: 256px;
                                        image-rendering: pixelated; }
  #editor-mask { opacity: 0.55; cursor: crosshair; touch-action: none; }
  #editor .controls { flex: 1; min-width: 220px; max-width: 420px; }
  #editor .hint { color: #555; font-size: 12px; margin: 4px 0 6px; }
  #editor-run { background: #1565c0; color: white; border: 0; border-radius: 3px; }
  #editor-run:disabled { background: #90a4ae; }
  #edit-report { display: flex; gap: 8px; align-items: center; margin-bottom: 8px; color: #37474f; }
  #edit-report img { width: 48px; height: 48px; image-rendering: pixelated; border: 1px solid #ccc; }
</style>
</head>
<body>
<header><h1>argen</h1><span id="models"></span></header>
<main>
  <form id="form" autocomplete="off">
    <fieldset>
      <legend>Prompt <span id="uncond" hidden>unconditional</span></legend>
      <textarea id="prompt" rows="3" placeholder="a red circle above a blue square (empty: unconditional)"></textarea>
    </fieldset>
    <fieldset id="job-fields"><legend>Images</legend></fieldset>
    <fieldset id="systems"><legend>Models, side by side</legend></fieldset>
    <fieldset id="gpt-fields"><legend>AR token GPT sampler</legend></fieldset>
    <fieldset id="unclip-fields" hidden><legend>unCLIP sampler</legend></fieldset>
    <button id="generate" type="submit">Generate</button><button id="cancel" type="button" disabled>Cancel</button>
  </form>
  <section id="output">
    <div id="message" role="alert" hidden></div>
    <ul id="warnings"></ul>
    <div id="status" data-state="idle"><progress id="progress" max="1" value="0" hidden></progress>
      <span id="state"></span></div>
    <div id="editor" hidden>
      <div id="canvas-box"><img id="editor-image" alt="the image to inpaint"><canvas id="editor-cells" width="256"
        height="256"></canvas><canvas id="editor-mask" width="256" height="256"></canvas></div>
      <div class="controls">
        <h2>Inpaint <span id="editor-source"></span></h2>
        <div class="hint">Paint over the part to regenerate (mouse, pen or finger). It is snapped outward to the
          model's code grid (outlined); the pixels outside it are kept. Number of images, seed and sampler: the form's.</div>
        <label class="field">brush <input id="editor-brush" type="range" min="4" max="64" value="24"></label>
        <div id="editor-count" class="hint"></div>
        <label for="editor-prompt">prompt for the new region's image</label>
        <textarea id="editor-prompt" rows="2"></textarea>
        <button id="editor-run" type="button">Inpaint</button><button id="editor-clear" type="button">Clear</button><button
          id="editor-close" type="button">Close</button>
      </div>
    </div>
    <div id="edit-report" hidden><img id="edit-source" alt="the edited image"><span id="edit-text"></span></div>
    <div id="downloads" hidden><a id="zip" href="#">Download images + settings (zip)</a>
      <a id="settings" href="#">settings.json</a></div>
    <div id="results"></div>
  </section>
</main>
<script>
"use strict";
// Per-image actions: each {label, applies(column), run(jobId, column, index)} adds a button under every image of the
// columns it applies to.
const IMAGE_TOOLS = [
  {label: "Inpaint", applies: (column) => family(column.id) === "gpt", run: openEditor},
  {label: "Variations", applies: (column) => family(column.id) === "unclip", run: variations},
];
const POLL_MS = 300;
const EDITOR_PX = 256;  // the editor's canvas side in CSS pixels; the mask sent has the image's own size
let config = null, job = null, timer = null, busy = false, editor = null, stroke = null;
const $ = (id) => document.getElementById(id);
const family = (id) => config.systems.find((s) => s.id === id).family;
const imageUrl = (jobId, columnId, k) => "/api/jobs/" + jobId + "/images/" + columnId + "/" + k + ".png";

async function api(path, options) {
  let response;
  try { response = await fetch(path, options); }
  catch (err) { throw new Error("the server cannot be reached (" + err.message + ")"); }
  let body;
  try { body = await response.json(); }
  catch (err) { body = {error: "the server answered " + response.status + " " + response.statusText}; }
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}

function showMessage(text) { $("message").textContent = text; $("message").hidden = !text; }

function fieldInput(field, group) {
  const label = document.createElement("label");
  const id = group + "-" + field.name;
  let input;
  if (field.kind === "choice") {
    input = document.createElement("select");
    for (const c of field.choices) input.add(new Option(c, c));
    input.value = field.default;
  } else if (field.kind === "bool") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = !!field.default;
  } else {
    input = document.createElement("input");
    input.type = "number";
    input.step = "any";
    if (field.default !== null) input.value = field.default;
    input.placeholder = field.optional ? "none" : "";
  }
  input.id = id;
  input.dataset.group = group;
  input.dataset.name = field.name;
  input.dataset.kind = field.kind;
  label.className = "field";
  label.htmlFor = id;
  label.append(field.label, input);
  if (field.help) label.title = field.help;
  return label;
}

async function loadConfig() {
  config = await api("/api/config");
  const roads = {gpt: "GPT", unclip: "unCLIP"};
  $("models").textContent = [...new Set(config.systems.map((s) => roads[s.family] + " " + s.path))].join("  ·  ");
  for (const f of config.fields.job) $("job-fields").append(fieldInput(f, "job"));
  for (const f of config.fields.gpt) $("gpt-fields").append(fieldInput(f, "gpt"));
  for (const f of config.fields.unclip) $("unclip-fields").append(fieldInput(f, "unclip"));
  $("unclip-fields").hidden = config.fields.unclip.length === 0;
  $("gpt-fields").hidden = !config.systems.some((s) => s.family === "gpt");
  for (const s of config.systems) {
    const label = document.createElement("label");
    label.className = "check";
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.value = s.id; box.name = "system"; box.id = "system-" + s.id;
    label.append(box, " " + s.name);
    $("systems").append(label);
  }
}

function collect() {
  const request = {prompt: $("prompt").value, systems: [], gpt: {}, unclip: {}};
  for (const box of document.querySelectorAll("input[name=system]")) if (box.checked) request.systems.push(box.value);
  for (const input of document.querySelectorAll("[data-group]")) {
    const value = input.dataset.kind === "bool" ? input.checked : input.value;
    if (input.dataset.group === "job") request[input.dataset.name] = value;
    else request[input.dataset.group][input.dataset.name] = value;
  }
  return request;
}

function setBusy(value) {
  busy = value;
  $("generate").disabled = busy; $("cancel").disabled = !busy; $("editor-run").disabled = busy;
  for (const b of document.querySelectorAll("button.tool")) b.disabled = busy;
}

async function generate(event) {
  event.preventDefault();
  await startJob("/api/jobs", collect());
}

// Queue a job (a generation, or an edit of one image) and follow it; a refusal leaves the results as they were.
async function startJob(path, body) {
  showMessage("");
  $("warnings").replaceChildren();
  let started;
  try {
    started = await api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  } catch (err) {
    showMessage(err.message);
    $("status").dataset.state = "refused";
    return;
  }
  $("downloads").hidden = true;
  job = {id: started.id, rendered: {}, prompt: started.prompt, edit: started.edit};
  $("results").replaceChildren();
  showEdit(started.edit);
  setBusy(true);
  render(started);
  timer = setTimeout(poll, POLL_MS);
}

function showEdit(edit) {
  $("edit-report").hidden = !edit;
  if (!edit) return;
  const name = config.systems.find((s) => s.id === edit.column).name;
  const source = name + " image " + (edit.index + 1) + " of job " + edit.job.slice(0, 8);
  $("edit-source").src = imageUrl(edit.job, edit.column, edit.index);
  $("edit-text").textContent = edit.tool === "inpaint" ? "Inpainting " + source + ": " + edit.region + "." :
    "Variations of " + source + ": its CLIP image embedding decoded again, each image from its own noise.";
}

// ------------------------------------------------------------------------------------------ editing tools
function variations(jobId, column, k) {
  const r = collect();
  startJob("/api/jobs/" + jobId + "/images/" + column.id + "/" + k + "/variations", {n: r.n, seed: r.seed, unclip: r.unclip});
}

function openEditor(jobId, column, k) {
  const system = config.systems.find((s) => s.id === column.id);
  editor = {jobId: jobId, column: column.id, index: k, resolution: system.resolution, grid: system.grid};
  $("editor-source").textContent = "(" + column.name + ", image " + (k + 1) + ")";
  $("editor-image").src = imageUrl(jobId, column.id, k);
  $("editor-prompt").value = job.prompt;
  $("editor").hidden = false;
  clearMask();
  $("editor").scrollIntoView({block: "nearest"});
}

function clearMask() {
  $("editor-mask").getContext("2d").clearRect(0, 0, EDITOR_PX, EDITOR_PX);
  showCells();
}

function maskPoint(event) {
  const r = $("editor-mask").getBoundingClientRect();
  return [(event.clientX - r.left) * EDITOR_PX / r.width, (event.clientY - r.top) * EDITOR_PX / r.height];
}

function paintTo(point) {  // a round brush from the stroke's last point to `point`
  const ctx = $("editor-mask").getContext("2d"), width = Number($("editor-brush").value);
  ctx.strokeStyle = ctx.fillStyle = "#7c4dff";
  ctx.lineWidth = width; ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(stroke[0], stroke[1]); ctx.lineTo(point[0], point[1]); ctx.stroke();
  ctx.beginPath(); ctx.arc(point[0], point[1], width / 2, 0, 2 * Math.PI); ctx.fill();
  stroke = point;
}

function maskPixels() {  // (R * R,) row-major: 1 where the paint covers at least half of an image pixel's centre
  const R = editor.resolution, marked = new Uint8Array(R * R);
  const d = $("editor-mask").getContext("2d").getImageData(0, 0, EDITOR_PX, EDITOR_PX).data;
  for (let y = 0; y < EDITOR_PX; y++) for (let x = 0; x < EDITOR_PX; x++) {
    if (d[4 * (y * EDITOR_PX + x) + 3] > 127) marked[Math.floor(y * R / EDITOR_PX) * R + Math.floor(x * R / EDITOR_PX)] = 1;
  }
  return marked;
}

function showCells() {  // outline the codes the server will regenerate: the mask snapped outward to the code grid
  if (!editor) return;
  const R = editor.resolution, g = editor.grid, f = R / g, side = EDITOR_PX / g, marked = maskPixels();
  const cells = new Uint8Array(g * g);
  marked.forEach((m, i) => { if (m) cells[Math.floor(Math.floor(i / R) / f) * g + Math.floor((i % R) / f)] = 1; });
  const ctx = $("editor-cells").getContext("2d");
  ctx.clearRect(0, 0, EDITOR_PX, EDITOR_PX);
  ctx.strokeStyle = "rgba(255, 255, 255, 0.35)"; ctx.lineWidth = 1;
  for (let i = 1; i < g; i++) {
    ctx.beginPath(); ctx.moveTo(i * side, 0); ctx.lineTo(i * side, EDITOR_PX); ctx.moveTo(0, i * side);
    ctx.lineTo(EDITOR_PX, i * side); ctx.stroke();
  }
  ctx.strokeStyle = "#ffd600"; ctx.lineWidth = 2;
  cells.forEach((c, i) => { if (c) ctx.strokeRect((i % g) * side + 1, Math.floor(i / g) * side + 1, side - 2, side - 2); });
  const n = cells.reduce((a, b) => a + b, 0);
  $("editor-count").textContent = n ? n + " of " + g * g + " codes marked (" + f + "×" + f + " px each)" : "nothing marked yet";
}

function maskPng() {  // the mask at the image's size: white = regenerate, black = keep (opaque, as argen edit --mask reads)
  const R = editor.resolution, marked = maskPixels(), canvas = document.createElement("canvas");
  canvas.width = canvas.height = R;
  const ctx = canvas.getContext("2d"), image = ctx.createImageData(R, R);
  marked.forEach((m, i) => { image.data.fill(m ? 255 : 0, 4 * i, 4 * i + 3); image.data[4 * i + 3] = 255; });
  ctx.putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

function inpaint() {
  const r = collect();
  startJob("/api/jobs/" + editor.jobId + "/images/" + editor.column + "/" + editor.index + "/inpaint",
           {prompt: $("editor-prompt").value, mask: maskPng(), n: r.n, seed: r.seed, gpt: r.gpt});
}

function setUpEditor() {
  const mask = $("editor-mask");
  mask.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    mask.setPointerCapture(event.pointerId);
    stroke = maskPoint(event);
    paintTo(stroke);
  });
  mask.addEventListener("pointermove", (event) => { if (stroke) { paintTo(maskPoint(event)); showCells(); } });
  for (const type of ["pointerup", "pointercancel"]) mask.addEventListener(type, () => { stroke = null; showCells(); });
  $("editor-clear").addEventListener("click", clearMask);
  $("editor-close").addEventListener("click", () => { $("editor").hidden = true; editor = null; });
  $("editor-run").addEventListener("click", inpaint);
}

async function poll() {
  if (!job) return;
  let status;
  try { status = await api("/api/jobs/" + job.id); }
  catch (err) { showMessage(err.message); setBusy(false); $("status").dataset.state = "failed"; return; }
  render(status);
  if (["done", "cancelled", "failed"].includes(status.state)) { setBusy(false); return; }
  timer = setTimeout(poll, POLL_MS);
}

function ordinal(n) { return n + (n === 1 ? "st" : n === 2 ? "nd" : n === 3 ? "rd" : "th"); }

function render(status) {
  const list = $("warnings");
  if (list.children.length !== status.warnings.length) {
    list.replaceChildren(...status.warnings.map((w) => { const li = document.createElement("li"); li.textContent = w; return li; }));
  }
  const progress = $("progress");
  progress.hidden = status.state !== "running";
  progress.value = status.progress;
  const words = {queued: "queued, " + ordinal(status.position) + " in line", running: "generating… " +
                 Math.round(100 * status.progress) + "%", done: "done: " + status.message,
                 cancelled: status.message, failed: "failed"};
  $("state").textContent = words[status.state];
  $("status").dataset.state = status.state;
  if (status.state === "failed") showMessage(status.message);
  if (status.prompt !== undefined) job.prompt = status.prompt;
  for (const column of status.columns) renderColumn(column, status);
  if (status.state === "done" || (status.state === "cancelled" && status.columns.some((c) => c.images))) {
    $("zip").href = "/api/jobs/" + job.id + "/images.zip";
    $("settings").href = "/api/jobs/" + job.id + "/settings.json";
    $("zip").download = "argen_" + job.id + ".zip";
    $("settings").download = "argen_" + job.id + ".json";
    $("downloads").hidden = false;
  }
}

function renderColumn(column, status) {
  let div = document.getElementById("column-" + column.id);
  if (!div) {
    div = document.createElement("div");
    div.className = "column";
    div.id = "column-" + column.id;
    div.dataset.system = column.id;
    const title = document.createElement("h2");
    title.textContent = column.name;
    const note = document.createElement("div");
    note.className = "note";
    const grid = document.createElement("div");
    grid.className = "grid";
    const columns = status.columns.length;
    // sized so that up to four columns fit side by side in a laptop window; small images are scaled up, pixelated
    grid.style.setProperty("--per-row", columns <= 2 ? 4 : 2);
    grid.style.setProperty("--cell", columns === 1 ? "128px" : columns === 2 ? "80px" : "72px");
    div.append(title, note, grid);
    $("results").append(div);
    if (!column.note) for (let k = 0; k < status.n; k++) grid.append(figure(column, k, false));
  }
  div.querySelector(".note").textContent = column.note || (column.seconds !== null ? column.seconds.toFixed(2) + " s" : "");
  if (column.images && !job.rendered[column.id]) {
    job.rendered[column.id] = true;
    const grid = div.querySelector(".grid");
    grid.replaceChildren(...Array.from({length: column.images}, (_, k) => figure(column, k, true)));
  }
}

function figure(column, k, ready) {
  const fig = document.createElement("figure");
  fig.dataset.system = column.id;
  fig.dataset.index = k;
  if (!ready) { const box = document.createElement("div"); box.className = "pending"; fig.append(box); return fig; }
  const url = imageUrl(job.id, column.id, k);
  const link = document.createElement("a");
  link.href = url;
  link.download = (job.edit ? job.edit.tool + "_" : "") + column.id + "_" + String(k).padStart(2, "0") + ".png";
  const img = document.createElement("img");
  img.src = url;
  img.alt = column.name + ", image " + (k + 1);
  link.append(img);
  fig.append(link);
  const tools = IMAGE_TOOLS.filter((t) => t.applies(column));
  if (tools.length) {
    const caption = document.createElement("figcaption");
    for (const t of tools) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "tool"; b.textContent = t.label; b.disabled = busy;
      const jobId = job.id;
      b.onclick = () => t.run(jobId, column, k);
      caption.append(b);
    }
    fig.append(caption);
  }
  return fig;
}

async function cancel() {
  if (!job) return;
  try { await api("/api/jobs/" + job.id + "/cancel", {method: "POST"}); }
  catch (err) { showMessage(err.message); }
}

$("prompt").addEventListener("input", () => { $("uncond").hidden = $("prompt").value.trim() !== ""; });
$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
setUpEditor();
loadConfig().then(() => { $("uncond").hidden = $("prompt").value.trim() !== ""; $("status").dataset.state = "ready"; },
                  (err) => showMessage("could not load the settings: " + err.message));
</script>
</body>
</html>
"""


def page_html(title: str) -> str:
    """The page, titled `title`."""
    return _PAGE.replace("$TITLE", html.escape(title))
