// imgclf web page: no framework, no CDN. Each chosen or dropped image is sent
// on its own to POST /v1/predict (the server batches concurrent requests), and
// shown with its top-k labels as bars; when the server holds the run's
// similarity index, also with the most similar training images (/v1/similar).
// A detector's answer (boxes) is drawn on the picture, on a canvas.
"use strict";
const $ = (id) => document.getElementById(id);
const TOP_K = 5;
const SIMILAR_K = 6;
let similarAvailable = false;
let modelClasses = [];
// One colour per class, in turn (as `imgclf predict --save-images` draws them).
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModelInfo() {
  try {
    const r = await fetch("/v1/model", { headers: headers() });
    const j = await r.json();
    if (!r.ok) {
      $("model-info").textContent = j.error ? j.error.message : "model information unavailable";
      if (r.status === 401) $("key-box").open = true;
      return;
    }
    similarAvailable = Boolean(j.similar && j.similar.available);
    modelClasses = j.classes;
    const m = j.metrics || {};
    const acc = m.accuracy != null ? `, ${(100 * m.accuracy).toFixed(1)}% accuracy on ${m.split}`
      : m.map50 != null ? `, mAP@.5 ${m.map50.toFixed(3)} on ${m.split}` : "";
    $("model-info").textContent =
      `${j.arch}${j.int8 ? " (INT8)" : ""}: ${j.num_classes} classes (${j.classes.slice(0, 8).join(", ")}` +
      `${j.num_classes > 8 ? ", …" : ""}), ${j.input_size}px input${acc}`;
  } catch (e) {
    $("model-info").textContent = "cannot reach the server: " + e;
  }
}

function card(file) {
  const el = document.createElement("article");
  el.className = "card";
  const img = document.createElement("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);  // local preview; nothing is uploaded for it
  const body = document.createElement("div");
  body.className = "body";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = "…";
  body.append(name, label);
  el.append(img, body);
  $("results").prepend(el);
  return { el, body, label };
}

function showPrediction(c, pred) {
  c.label.textContent = pred.label === "unknown" ? "unknown (none of the classes)" : pred.label;
  c.label.dataset.testid = "label";
  if (typeof pred.unknown === "number") c.label.title = `unknown score ${pred.unknown.toFixed(2)}`;
  c.el.dataset.label = pred.label;
  for (const t of pred.top) {
    const row = document.createElement("div");
    row.className = "bar";
    const cls = document.createElement("span"); cls.className = "cls"; cls.textContent = t.label;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.width = (100 * t.score).toFixed(1) + "%";
    fill.style.display = "block";
    track.append(fill);
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = (100 * t.score).toFixed(1) + "%";
    row.append(cls, track, pct);
    row.setAttribute("aria-label", `${t.label} ${(100 * t.score).toFixed(1)} percent`);
    c.body.append(row);
  }
}

function showDetections(c, pred) {
  const n = pred.boxes.length;
  const counts = {};
  for (const b of pred.boxes) counts[b.label] = (counts[b.label] || 0) + 1;
  c.label.textContent = `${n} object${n === 1 ? "" : "s"}`;
  c.label.dataset.testid = "label";
  c.el.dataset.boxes = String(n);
  for (const [label, k] of Object.entries(counts)) {
    const row = document.createElement("div");
    row.className = "count";
    row.textContent = `${k} × ${label}`;
    c.body.append(row);
  }
  const img = c.el.querySelector("img");
  const draw = () => {
    // The picture at the size the server measured the boxes in (its own pixels, upright).
    const canvas = document.createElement("canvas");
    canvas.width = pred.width;
    canvas.height = pred.height;
    canvas.className = "boxes";
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${c.label.textContent}: ` +
      Object.entries(counts).map(([l, k]) => `${k} ${l}`).join(", "));
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, pred.width, pred.height);
    ctx.lineWidth = Math.max(2, pred.width / 300);
    ctx.font = `${Math.max(12, Math.round(pred.width / 50))}px system-ui, sans-serif`;
    for (const b of pred.boxes) {
      const i = modelClasses.indexOf(b.label);
      ctx.strokeStyle = ctx.fillStyle = PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
      const [x1, y1, x2, y2] = b.box;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillText(`${b.label} ${b.score.toFixed(2)}`, x1 + 3, Math.max(y1 - 3, 12));
    }
    img.replaceWith(canvas);
    c.el.dataset.drawn = "true";
  };
  if (img.complete && img.naturalWidth) draw(); else img.addEventListener("load", draw, { once: true });
}

async function showSimilar(c, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const box = document.createElement("div");
  box.className = "similar";
  c.body.append(box);
  try {
    const r = await fetch(`/v1/similar?k=${SIMILAR_K}`, { method: "POST", body: form, headers: headers() });
    const j = await r.json();
    if (!r.ok) { box.textContent = j.error ? j.error.message : `HTTP ${r.status}`; return; }
    const title = document.createElement("div");
    title.className = "muted";
    title.textContent = "most similar training images";
    box.append(title);
    for (const nb of j.results[0].neighbours) {
      const fig = document.createElement("figure");
      fig.dataset.label = nb.label;
      const img = document.createElement("img");
      img.src = nb.thumbnail;  // a data: URL from the server's in-memory index
      img.alt = `${nb.label}, similarity ${nb.similarity.toFixed(2)}`;
      img.title = nb.path;
      const cap = document.createElement("figcaption");
      cap.textContent = `${nb.label} ${nb.similarity.toFixed(2)}`;
      fig.append(img, cap);
      box.append(fig);
    }
  } catch (e) {
    box.textContent = String(e);
  }
}

async function classify(file) {
  const c = card(file);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch(`/v1/predict?top_k=${TOP_K}`, { method: "POST", body: form, headers: headers() });
    const j = await r.json();
    if (!r.ok) {
      c.label.textContent = "error";
      c.label.className = "label error";
      const msg = document.createElement("div");
      msg.className = "error";
      msg.textContent = j.error ? j.error.message : `HTTP ${r.status}`;
      c.body.append(msg);
      if (r.status === 401) $("key-box").open = true;
      return false;
    }
    if (j.predictions[0].boxes) showDetections(c, j.predictions[0]); else showPrediction(c, j.predictions[0]);
    if (similarAvailable) await showSimilar(c, file);
    return true;
  } catch (e) {
    c.label.textContent = "error";
    c.body.append(document.createTextNode(String(e)));
    return false;
  }
}

async function handle(files) {
  files = Array.from(files);
  if (!files.length) return;
  setStatus(`classifying ${files.length} image${files.length > 1 ? "s" : ""}…`);
  const ok = await Promise.all(files.map(classify));
  const bad = ok.filter((x) => !x).length;
  setStatus(bad ? `${bad} of ${files.length} failed` : `done: ${files.length} image${files.length > 1 ? "s" : ""}`, bad > 0);
}

const drop = $("drop");
["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));
$("file").addEventListener("change", (e) => { handle(e.target.files); e.target.value = ""; });
$("api-key").addEventListener("change", loadModelInfo);
loadModelInfo();
