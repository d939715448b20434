// The chexfound page: drop a CXR, see the model's view, sorted findings, and a heatmap per finding on click.
// Talks only to this server's API (/v1/model, /v1/predict?heatmaps=url and the URLs it returns).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { base: null, overlay: null, selected: null, request: 0 };

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not load " + url));
    img.src = url;
  });
}

// Draw the model's view, then the selected finding's overlay (already blended) at the chosen opacity.
function draw() {
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  if (!state.base) return;
  canvas.width = state.base.naturalWidth;
  canvas.height = state.base.naturalHeight;
  ctx.globalAlpha = 1;
  ctx.drawImage(state.base, 0, 0);
  if (state.overlay) {
    ctx.globalAlpha = Number($("opacity").value);
    ctx.drawImage(state.overlay, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
}

async function showModel() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    const sha = (m.backbone.weights_sha256 || "").slice(0, 12);
    const b = m.backbone;
    const size = b.num_params >= 1e6 ? `${(b.num_params / 1e6).toFixed(1)} M` : `${(b.num_params / 1e3).toFixed(0)} k`;
    $("model-summary").textContent =
      `${m.head.head_type} head, ${m.findings.length} findings, backbone ${b.name || ""} ` +
      `(${size} params, ${b.input_size} px, ${b.provenance || "unknown origin"}) ${sha}, ` +
      `${m.precision || "fp32"} on ${m.device || "?"}` +
      ` · heatmaps: ${(m.head.heatmap_kind || "none").replace(/_/g, " ")}`;
    $("model-summary").title = `backbone weights sha256 ${b.weights_sha256 || "?"}`;
    showModelBanner(m);
  } catch (e) {
    $("model-summary").textContent = "model info unavailable";
  }
}

// A head that cannot tell images apart (chexfound.stats.informative) says so above everything, and the page
// shows no POSITIVE badge for it: its probabilities are listed, not called.
function showModelBanner(m) {
  const inf = m.informative || {};
  const banner = $("model-banner");
  if (inf.informative === false) {
    banner.textContent = "This model is uninformative: " + (inf.reason || "its validation evidence is near-random") +
      ". Its outputs are shown but no finding is called positive or negative.";
    banner.hidden = false;
  } else if ((inf.uninformative_findings || []).length) {
    banner.textContent = `No calls for ${inf.uninformative_findings.length} finding(s) this model cannot tell ` +
      `apart on validation: ${inf.uninformative_findings.join(", ")}.`;
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

function showImageInfo(image) {
  const dl = $("image-info");
  dl.replaceChildren();
  const rows = [
    ["file", image.filename],
    ["format", image.source_format],
    ["size", image.original_size ? image.original_size.join(" × ") : null],
    ["photometric", image.photometric_interpretation],
    ["view", image.view_position],
  ];
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  dl.hidden = false;
}

async function selectFinding(li, finding) {
  for (const el of document.querySelectorAll("#findings li.selected")) el.classList.remove("selected");
  li.classList.add("selected");
  state.selected = finding.name;
  if (!finding.heatmap_url) return;
  $("caption").textContent = `heatmap: ${finding.name} (loading…)`;
  try {
    const img = await loadImage(finding.heatmap_url);
    if (state.selected !== finding.name) return; // another finding was clicked meanwhile
    state.overlay = img;
    draw();
    const kind = state.heatmapKind ? ` (${state.heatmapKind.replace(/_/g, " ")})` : "";
    $("caption").textContent = `heatmap${kind}: ${finding.name}`;
    $("caption").title = state.heatmapDescription || "";
    $("view").dataset.heatmap = finding.name;
  } catch (e) {
    $("caption").textContent = `heatmap for ${finding.name} unavailable (${e.message})`;
  }
}

function showFindings(result) {
  const list = $("findings");
  list.replaceChildren();
  const sorted = [...result.findings].sort((a, b) => b.probability - a.probability);
  for (const f of sorted) {
    const li = document.createElement("li");
    li.tabIndex = 0;
    li.dataset.name = f.name;
    li.dataset.probability = String(f.probability);
    if (f.positive === true) li.classList.add("positive");
    if (f.positive === undefined || f.positive === null) li.classList.add("nocall");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = f.name;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = (100 * f.probability).toFixed(1) + " %";
    const rule = f.threshold_rule ? `, ${f.threshold_rule} rule${f.threshold_reason ? ": " + f.threshold_reason : ""}` : "";
    const thr = (f.threshold === undefined || f.threshold === null) ? "no threshold" : `threshold ${(100 * f.threshold).toFixed(1)} %`;
    const cal = f.calibration ? `, calibration: ${f.calibration}` : "";
    prob.title = `${thr}${rule}${cal}` + (f.informative === false ? ` (no call: ${f.uninformative_reason || "uninformative"})` : "");
    if (f.informative === false) {
      const tag = document.createElement("span");
      tag.className = "nocall-tag";
      tag.textContent = "no call";
      name.append(tag);
    }
    li.title = prob.title;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = Math.max(0, Math.min(100, 100 * f.probability)).toFixed(1) + "%";
    bar.append(fill);
    li.append(name, prob, bar);
    li.addEventListener("click", () => selectFinding(li, f));
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") selectFinding(li, f); });
    list.append(li);
  }
  state.heatmapKind = result.heatmaps.kind;  // what the maps show: said in the caption
  state.heatmapDescription = result.heatmaps.description;
  const note = $("heatmap-note");
  note.hidden = result.heatmaps.available;
  note.textContent = result.heatmaps.available ? "" : "Heatmaps unavailable: " + result.heatmaps.reason;
  $("right").hidden = false;
}

// Forget the previous image: what the page shows always belongs to the file named in the status line
// (after a failed upload, the last image's findings and heatmap must not stay under the error).
function clearResult() {
  state.base = null;
  state.overlay = null;
  state.selected = null;
  const canvas = $("view");
  delete canvas.dataset.heatmap;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("viewer").hidden = true;
  $("caption").textContent = "";
  $("findings").replaceChildren();
  $("heatmap-note").hidden = true;
  $("right").hidden = true;
  $("image-info").replaceChildren();
  $("image-info").hidden = true;
  $("image-warning").replaceChildren();
  $("image-warning").hidden = true;
}

async function analyse(file) {
  const request = ++state.request;
  clearResult();
  setStatus(`Analysing ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  let r, body;
  try {
    r = await fetch("/v1/predict?heatmaps=url", { method: "POST", body: form });
    body = await r.json().catch(() => ({ detail: r.statusText }));
  } catch (e) {
    if (request === state.request) {
      clearResult();
      setStatus("Could not reach the server: " + e.message, true);
    }
    return;
  }
  if (request !== state.request) return; // a newer upload superseded this one
  if (!r.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    clearResult();
    setStatus(`Error ${r.status}: ${detail}`, true);
    return;
  }
  let base;
  try {
    base = await loadImage(body.image.image_url);
  } catch (e) {
    if (request === state.request) {
      clearResult();
      setStatus(e.message, true);
    }
    return;
  }
  if (request !== state.request) return;
  state.base = base;
  $("viewer").hidden = false;
  draw();
  $("caption").textContent = body.heatmaps.available ? "click a finding to overlay its heatmap" : "";
  showImageInfo(body.image);
  showFindings(body);
  const warn = $("image-warning");
  warn.textContent = (body.image.warnings || []).map((w) => "Warning: " + w).join(" ");
  warn.hidden = !(body.image.warnings || []).length;
  const n = body.positive.length;
  const shown = body.positive.slice(0, 4).join(", ") + (n > 4 ? ", …" : "");
  const pos = body.uninformative ? "no calls (uninformative model)"
    : (n ? `${n} positive: ${shown}` : "no finding above its threshold");
  setStatus(`${file.name}: ${pos} (${Math.round(body.timing_ms.decode + body.timing_ms.model)} ms)`);
}

function setupDrop() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => {
    if (!input.files.length) return;
    const file = input.files[0];
    input.value = ""; // so choosing the same file again re-runs it
    analyse(file);
  });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  $("opacity").addEventListener("input", draw);
}

setupDrop();
showModel();
