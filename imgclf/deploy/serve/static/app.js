// imgclf web page: no framework, no CDN. Each chosen or dropped image is sent
// on its own to POST /v1/predict (the server batches concurrent requests), and
// shown with its top-k labels as bars; when the server holds the run's
// similarity index, also with the most similar training images (/v1/similar).
// A detector's answer (boxes) is drawn on the picture, on a canvas; a
// segmenter's label map is laid over it, translucent, in its classes' colours,
// with each class's share of the pixels. A camera frame goes the same way.
"use strict";
const $ = (id) => document.getElementById(id);
const TOP_K = 5;
const SIMILAR_K = 6;
let similarAvailable = false;
let modelClasses = [];
const MASK_ALPHA = 0.5;  // how much of a segmenter's class colour covers the picture
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
      : m.map50 != null ? `, mAP@.5 ${m.map50.toFixed(3)} on ${m.split}`
      : m.miou != null ? `, mIoU ${m.miou.toFixed(3)} on ${m.split}` : "";
    $("model-info").textContent =
      `${j.arch}${j.int8 ? " (INT8)" : ""}: ${j.num_classes} classes (${j.classes.slice(0, 8).join(", ")}` +
      `${j.num_classes > 8 ? ", …" : ""}), ${j.input_size}px input${j.resize === "longer_side" ? " (longer side)" : ""}${acc}`;
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
  // The picture at the size the server measured the boxes in (its own pixels, upright).
  onCanvas(c, pred, "boxes", (ctx, canvas) => {
    canvas.setAttribute("aria-label", `${c.label.textContent}: ` +
      Object.entries(counts).map(([l, k]) => `${k} ${l}`).join(", "));
    ctx.lineWidth = Math.max(2, pred.width / 300);
    ctx.font = `${Math.max(12, Math.round(pred.width / 50))}px system-ui, sans-serif`;
    for (const b of pred.boxes) {
      const i = modelClasses.indexOf(b.label);
      ctx.strokeStyle = ctx.fillStyle = PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
      const [x1, y1, x2, y2] = b.box;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillText(`${b.label} ${b.score.toFixed(2)}`, x1 + 3, Math.max(y1 - 3, 12));
    }
  });
}

/** A picture's card image -> a canvas at the answer's size (the image's own pixels, upright), then draw(ctx). */
function onCanvas(c, pred, className, draw) {
  const img = c.el.querySelector("img");
  const paint = async () => {
    const canvas = document.createElement("canvas");
    canvas.width = pred.width;
    canvas.height = pred.height;
    canvas.className = className;
    canvas.setAttribute("role", "img");
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0, pred.width, pred.height);
    await draw(ctx, canvas);
    img.replaceWith(canvas);
    c.el.dataset.drawn = "true";
  };
  if (img.complete && img.naturalWidth) paint(); else img.addEventListener("load", paint, { once: true });
}

function showSegmentation(c, pred, legend) {
  const shares = Object.entries(pred.classes).sort((a, b) => b[1] - a[1]);
  const colour = Object.fromEntries(legend.map((e) => [e.name, e.color]));
  c.label.textContent = shares.length ? `${shares[0][0]} ${(100 * shares[0][1]).toFixed(0)}%` : "no classes";
  c.label.dataset.testid = "label";
  c.el.dataset.classes = String(shares.length);
  for (const [name, share] of shares) {
    const row = document.createElement("div");
    row.className = "bar share";
    const cls = document.createElement("span"); cls.className = "cls";
    const swatch = document.createElement("span"); swatch.className = "swatch";
    swatch.style.background = colour[name];
    cls.append(swatch, document.createTextNode(name));
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.width = (100 * share).toFixed(1) + "%";
    fill.style.display = "block";
    fill.style.background = colour[name];
    track.append(fill);
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = (100 * share).toFixed(1) + "%";
    row.append(cls, track, pct);
    row.setAttribute("aria-label", `${name} ${(100 * share).toFixed(1)} percent of the pixels`);
    c.body.append(row);
  }
  onCanvas(c, pred, "mask", async (ctx, canvas) => {
    // The label map is a palette PNG whose palette is the legend's colours: drawn as is, it is the colour mask.
    const mask = new Image();
    mask.src = "data:image/png;base64," + pred.mask_png;
    await mask.decode();
    ctx.globalAlpha = MASK_ALPHA;
    ctx.drawImage(mask, 0, 0, pred.width, pred.height);
    ctx.globalAlpha = 1;
    canvas.setAttribute("aria-label", "class map: " + shares.map(([n, v]) => `${n} ${(100 * v).toFixed(0)}%`).join(", "));
  });
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
    const pred = j.predictions[0];
    if (pred.mask_png) showSegmentation(c, pred, j.legend);
    else if (pred.boxes) showDetections(c, pred);
    else showPrediction(c, pred);
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

// Camera: a live preview; "Predict this frame" sends the current frame as a JPEG, answered like a dropped picture.
let stream = null;
$("camera-start").addEventListener("click", async () => {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  } catch (e) {
    setStatus(`no camera: ${e.message || e} (the page needs camera permission, and https or localhost)`, true);
    return;
  }
  $("video").srcObject = stream;
  await $("video").play();
  $("camera").hidden = false;
});
$("capture").addEventListener("click", () => {
  const v = $("video");
  if (!v.videoWidth) return;
  const canvas = Object.assign(document.createElement("canvas"), { width: v.videoWidth, height: v.videoHeight });
  canvas.getContext("2d").drawImage(v, 0, 0);
  canvas.toBlob((blob) => handle([new File([blob], "camera frame.jpg", { type: "image/jpeg" })]), "image/jpeg", 0.9);
});
$("camera-stop").addEventListener("click", () => {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("camera").hidden = true;
});
loadModelInfo();
