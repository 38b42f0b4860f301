// The inspection page of `mudenet serve`: plain JS, no build step, nothing loaded from elsewhere.
// Every re-threshold (decision, mask contour, bounding boxes) is computed here from the quantised map the
// server sent (uint8 + its range), without a new request. Regions: 8-connected components of map >= t, the
// rule of mudenet_core/serve/inference.py:regions.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("mudenet_token") || "", results: [], current: null, threshold: null };

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await res.json(); } catch (e) { body = { detail: res.statusText }; }
  if (res.status === 401) { $("auth-panel").hidden = false; }
  if (!res.ok) throw new Error((body && body.detail) || ("HTTP " + res.status));
  return body;
}

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Math.abs(x) >= 1000 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(4) : x.toPrecision(5);
}

// ------------------------------------------------------------------------------------------- status, models
async function refreshStatus() {
  const s = await api("/api/status");
  if (s.auth_required && !state.token) $("auth-panel").hidden = false;
  const m = s.model;
  $("status").textContent = m
    ? `${m.model_id} · ${m.method} · ${m.input_size} px · threshold ${fmt(m.threshold)} · ${s.device} · v${s.version}`
    : `no model loaded · v${s.version}`;
  $("model-info").textContent = m ? `threshold from ${m.threshold_source}` : "";
  return s;
}

async function refreshModels() {
  const sel = $("model-select");
  const data = await api("/api/models");
  sel.innerHTML = "";
  for (const m of data.models) {
    const o = document.createElement("option");
    o.value = m.model_id;
    const auroc = m.validation && m.validation.image_auroc !== undefined ? ` · val AUROC ${fmt(m.validation.image_auroc)}` : "";
    o.textContent = `${m.model_id} (${m.method}, ${m.dataset}/${m.category}, seed ${m.seed}${auroc})`;
    if (m.loaded) o.selected = true;
    sel.appendChild(o);
  }
  if (!data.models.length) {
    const o = document.createElement("option");
    o.textContent = "(no registered model)"; o.disabled = true; sel.appendChild(o);
  }
}

async function loadModel() {
  showError("");
  try {
    await api("/api/load_model", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model_id: $("model-select").value }) });
    await refreshStatus(); await refreshModels();
  } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------------------------------- upload
async function upload(files) {
  showError("");
  if (!files.length) return;
  $("busy").textContent = `scoring ${files.length} file(s)…`;
  try {
    const form = new FormData();
    const single = files.length === 1 && !/\.zip$/i.test(files[0].name);
    if (single) {
      form.append("file", files[0]);
      const r = await api("/api/test_image", { method: "POST", body: form });
      state.results = [r];
    } else {
      for (const f of files) form.append("files", f);
      form.append("include_maps", "true");
      const r = await api("/api/batch_test", { method: "POST", body: form });
      state.results = r.results;
    }
    const first = state.results.find((r) => r.map);
    state.threshold = first ? first.threshold : null;
    renderBatch();
    if (first) await show(first);
  } catch (e) { showError(e.message); }
  $("busy").textContent = "";
}

// ------------------------------------------------------------------------------------------- map and regions
function decodeMap(m) {
  const bytes = Uint8Array.from(atob(m.data), (c) => c.charCodeAt(0));
  const [h, w] = m.shape, values = new Float32Array(h * w), scale = (m.max - m.min) / 255;
  for (let i = 0; i < h * w; i++) values[i] = m.min + bytes[i] * scale;
  return { h, w, values };
}

function regionsAt(map, t) {
  // 8-connected components of values >= t: [{x0, y0, x1, y1 (half-open), area, peak}], largest first
  const { h, w, values } = map, seen = new Uint8Array(h * w), out = [], stack = [];
  for (let start = 0; start < h * w; start++) {
    if (seen[start] || !(values[start] >= t)) continue;
    let x0 = w, y0 = h, x1 = 0, y1 = 0, area = 0, peak = -Infinity;
    seen[start] = 1; stack.push(start);
    while (stack.length) {
      const p = stack.pop(), y = Math.floor(p / w), x = p - y * w;
      area++; peak = Math.max(peak, values[p]);
      x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + 1); y1 = Math.max(y1, y + 1);
      for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
        const yy = y + dy, xx = x + dx;
        if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
        const q = yy * w + xx;
        if (!seen[q] && values[q] >= t) { seen[q] = 1; stack.push(q); }
      }
    }
    out.push({ x0, y0, x1, y1, area, peak });
  }
  return out.sort((a, b) => b.area - a.area || a.y0 - b.y0 || a.x0 - b.x0);
}

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("cannot display the image"));
    im.src = "data:image/png;base64," + b64;
  });
}

async function show(r) {
  const [image, heat] = await Promise.all([loadImage(r.image_png), loadImage(r.anomaly_map_png)]);
  state.current = { r, image, heat, map: decodeMap(r.map) };
  $("result").hidden = false;
  $("filename").textContent = r.filename;
  $("threshold-source").textContent = r.threshold_source ? `default threshold: ${r.threshold_source}` : "";
  const canvas = $("view"), side = 512, f = side / Math.max(image.naturalWidth, image.naturalHeight);
  canvas.width = Math.round(image.naturalWidth * f); canvas.height = Math.round(image.naturalHeight * f);
  setupSlider(r);
  for (const tr of $("batch-table").querySelectorAll("tbody tr")) tr.classList.toggle("selected", tr.dataset.name === r.filename);
  redraw();
}

function setupSlider(r) {
  const m = r.map, s = $("threshold");
  const t = state.threshold !== null && state.threshold !== undefined ? state.threshold : (m.min + m.max) / 2;
  let lo = Math.min(m.min, r.score, t), hi = Math.max(m.max, r.score, t);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  lo -= pad; hi += pad;
  s.min = String(lo); s.max = String(hi); s.step = String((hi - lo) / 2000);
  s.value = String(t);
}

function redraw() {
  const c = state.current;
  if (!c) return;
  const t = parseFloat($("threshold").value);
  state.threshold = t;
  const canvas = $("view"), ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  ctx.globalAlpha = 1; ctx.drawImage(c.image, 0, 0, W, H);
  ctx.globalAlpha = parseFloat($("opacity").value); ctx.imageSmoothingEnabled = true;
  ctx.drawImage(c.heat, 0, 0, W, H);
  ctx.globalAlpha = 1;
  const { h, w, values } = c.map, sx = W / w, sy = H / h;
  // contour of the binary mask: mask pixels with a 4-neighbour outside it
  ctx.fillStyle = "#00e5ff";
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = y * w + x;
    if (!(values[i] >= t)) continue;
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !(values[i - 1] >= t) || !(values[i + 1] >= t)
      || !(values[i - w] >= t) || !(values[i + w] >= t);
    if (edge) ctx.fillRect(x * sx, y * sy, Math.max(1, sx), Math.max(1, sy));
  }
  const regions = regionsAt(c.map, t);
  ctx.strokeStyle = "#ffea00"; ctx.lineWidth = 2;
  for (const g of regions) ctx.strokeRect(g.x0 * sx, g.y0 * sy, (g.x1 - g.x0) * sx, (g.y1 - g.y0) * sy);
  canvas.dataset.drawn = "1";
  canvas.dataset.boxes = String(regions.length);
  const anomalous = c.r.score >= t;
  const d = $("decision");
  d.textContent = anomalous ? "anomalous" : "normal"; d.className = anomalous ? "anomalous" : "normal";
  $("score").textContent = fmt(c.r.score); $("threshold-value").textContent = fmt(t);
  $("n-regions").textContent = String(regions.length);
  const body = $("regions").querySelector("tbody");
  body.innerHTML = "";
  regions.slice(0, 20).forEach((g, k) => {
    const tr = document.createElement("tr");
    for (const v of [k + 1, `${g.x0}, ${g.y0}, ${g.x1}, ${g.y1}`, g.area, fmt(g.peak)]) {
      const td = document.createElement("td"); td.textContent = String(v); tr.appendChild(td);
    }
    body.appendChild(tr);
  });
  renderBatchDecisions();
}

// ------------------------------------------------------------------------------------------- batch table, CSV
function renderBatch() {
  const body = $("batch-table").querySelector("tbody");
  body.innerHTML = "";
  $("batch").hidden = state.results.length < 2;
  for (const r of state.results) {
    const tr = document.createElement("tr");
    tr.dataset.name = r.filename;
    const cells = r.error ? [r.filename, "–", "error: " + r.error, "–"] : [r.filename, fmt(r.score), "", ""];
    for (const v of cells) { const td = document.createElement("td"); td.textContent = v; tr.appendChild(td); }
    if (!r.error && r.map) tr.addEventListener("click", () => show(r));
    body.appendChild(tr);
  }
  renderBatchDecisions();
}

function decisionOf(r, t) {
  if (r.error) return { decision: "error", regions: "" };
  if (t === null || t === undefined || Number.isNaN(t)) return { decision: r.decision, regions: String(r.regions.length) };
  const n = r.map ? regionsAt(r._map || (r._map = decodeMap(r.map)), t).length : "";
  return { decision: r.score >= t ? "anomalous" : "normal", regions: String(n) };
}

function renderBatchDecisions() {
  const rows = $("batch-table").querySelectorAll("tbody tr");
  state.results.forEach((r, i) => {
    if (!rows[i] || r.error) return;
    const d = decisionOf(r, state.threshold);
    rows[i].children[2].textContent = d.decision; rows[i].children[3].textContent = d.regions;
  });
}

function csvCell(v) { const s = String(v); return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }

function batchCsv() {
  const lines = [["filename", "score", "threshold", "decision", "regions", "error"].join(",")];
  for (const r of state.results) {
    const d = decisionOf(r, state.threshold);
    lines.push([r.filename, r.error ? "" : r.score, r.error ? "" : state.threshold, d.decision, d.regions,
      r.error || ""].map(csvCell).join(","));
  }
  return lines.join("\n") + "\n";
}

function downloadCsv() {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([batchCsv()], { type: "text/csv" }));
  a.download = "batch_results.csv"; document.body.appendChild(a); a.click(); a.remove();
}

// ------------------------------------------------------------------------------------------- wiring
function wire() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
  $("file-input").addEventListener("change", (e) => upload([...e.target.files]));
  $("threshold").addEventListener("input", redraw);
  $("opacity").addEventListener("input", redraw);
  $("model-load").addEventListener("click", loadModel);
  $("csv").addEventListener("click", downloadCsv);
  $("token-save").addEventListener("click", async () => {
    state.token = $("token").value.trim(); sessionStorage.setItem("mudenet_token", state.token);
    $("auth-panel").hidden = true; showError("");
    try { await refreshStatus(); await refreshModels(); } catch (e) { showError(e.message); }
  });
}

window.mudenet = { regionsAt, decodeMap, batchCsv, state };
wire();
refreshStatus().then(refreshModels).catch((e) => showError(e.message));
