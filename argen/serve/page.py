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
    <!-- Editing controls (inpainting with a drawn mask, variations) go in a fieldset here when the library has them;
         per-image actions go in IMAGE_TOOLS below. -->
    <button id="generate" type="submit">Generate</button><button id="cancel" type="button" disabled>Cancel</button>
  </form>
  <section id="output">
    <div id="message" role="alert" hidden></div>
    <ul id="warnings"></ul>
    <div id="status" data-state="idle"><progress id="progress" max="1" value="0" hidden></progress>
      <span id="state"></span></div>
    <div id="downloads" hidden><a id="zip" href="#">Download images + settings (zip)</a>
      <a id="settings" href="#">settings.json</a></div>
    <div id="results"></div>
  </section>
</main>
<script>
"use strict";
// Per-image actions: each {label, applies(column), run(jobId, column, index)} adds a button under every image of the
// columns it applies to. Editing (variations, inpainting) will register here.
const IMAGE_TOOLS = [];
const POLL_MS = 300;
let config = null, job = null, timer = null;
const $ = (id) => document.getElementById(id);

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

function setBusy(busy) { $("generate").disabled = busy; $("cancel").disabled = !busy; }

async function generate(event) {
  event.preventDefault();
  showMessage("");
  $("warnings").replaceChildren();
  $("downloads").hidden = true;
  let started;
  try {
    started = await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(collect())});
  } catch (err) {
    showMessage(err.message);
    $("status").dataset.state = "refused";
    return;
  }
  job = {id: started.id, rendered: {}};
  $("results").replaceChildren();
  setBusy(true);
  render(started);
  timer = setTimeout(poll, POLL_MS);
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
  const url = "/api/jobs/" + job.id + "/images/" + column.id + "/" + k + ".png";
  const link = document.createElement("a");
  link.href = url;
  link.download = column.id + "_" + String(k).padStart(2, "0") + ".png";
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
      b.type = "button"; b.textContent = t.label; b.onclick = () => t.run(job.id, column, k);
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
loadConfig().then(() => { $("uncond").hidden = $("prompt").value.trim() !== ""; $("status").dataset.state = "ready"; },
                  (err) => showMessage("could not load the settings: " + err.message));
</script>
</body>
</html>
"""


def page_html(title: str) -> str:
    """The page, titled `title`."""
    return _PAGE.replace("$TITLE", html.escape(title))
