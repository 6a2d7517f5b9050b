// The page: pick, drop or photograph an image; show the model's top-k with scores
// (a detector: the picture with its boxes drawn; a segmenter: its label map over the picture).
import { loadClassifier, overlay, palette, pixels } from "./classifier.js";

const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };
const TOP_K = 5;
let clf = null;
const ready = loadClassifier("./").then((c) => {
  clf = c;
  const m = c.meta, acc = m.metrics && m.metrics.accuracy, map50 = m.metrics && m.metrics.map50,
    miou = m.metrics && m.metrics.miou;
  document.title = `imgclf: ${c.classes.join(", ")}`.slice(0, 80);
  $("model-info").textContent = `${m.arch}, ${c.classes.length} classes (${c.classes.join(", ")}), ` +
    `${m.input_size} px ${m.resize}` + (acc !== undefined ? `, held-out accuracy ${(acc * 100).toFixed(1)}%` : "") +
    (typeof map50 === "number" ? `, held-out mAP@.5 ${map50.toFixed(3)}` : "") +
    (typeof miou === "number" ? `, held-out mIoU ${miou.toFixed(3)}` : "");
  window.imgclfReadyAt = performance.now(); // ms since navigation: bench/bench_web.py reads it
  status("ready: choose, drop or photograph an image");
  return c;
}).catch((e) => { status(`could not load the model: ${e.message || e}`); throw e; });

function show(answer, previewUrl) {
  $("preview").src = previewUrl;
  $("label").textContent = answer.label === "unknown" ? "unknown: none of the classes" : answer.label || "no label";
  const extra = answer.unknown === undefined ? "" : `unknown score ${answer.unknown.toFixed(3)}; `;
  $("top").replaceChildren(...answer.top.map(({ label, score }) => {
    const li = document.createElement("li");
    li.className = "row";
    li.innerHTML = '<span class="cls"></span><span><span class="bar"></span></span><span class="score"></span>';
    li.querySelector(".cls").textContent = label;
    li.querySelector(".bar").style.width = `${(score * 100).toFixed(1)}%`;
    li.querySelector(".score").textContent = `${(score * 100).toFixed(1)}%`;
    return li;
  }));
  const ms = answer.ms;
  $("timing").textContent = extra + `${ms.total.toFixed(0)} ms (decoding ${ms.preprocess.toFixed(0)} ms, ` +
    `resize and model ${ms.inference.toFixed(0)} ms)`;
  $("result").hidden = false;
}

// One colour per class, in turn (as `imgclf predict --save-images` and the server's page draw them).
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];

/** A detector's answer: the picture (or camera frame) with its boxes drawn, and the count per class. */
async function showBoxes(answer, previewUrl, classes) {
  const img = new Image();
  img.src = previewUrl;
  await img.decode();
  const canvas = $("boxes");
  canvas.width = answer.width;
  canvas.height = answer.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, answer.width, answer.height);
  ctx.lineWidth = Math.max(2, answer.width / 300);
  ctx.font = `${Math.max(12, Math.round(answer.width / 50))}px system-ui, sans-serif`;
  const counts = {};
  for (const b of answer.boxes) {
    counts[b.label] = (counts[b.label] || 0) + 1;
    ctx.strokeStyle = ctx.fillStyle = PALETTE[Math.max(0, classes.indexOf(b.label)) % PALETTE.length];
    const [x1, y1, x2, y2] = b.box;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillText(`${b.label} ${b.score.toFixed(2)}`, x1 + 3, Math.max(y1 - 3, 12));
  }
  $("preview").hidden = true;
  canvas.hidden = false;
  const n = answer.boxes.length;
  $("label").textContent = `${n} object${n === 1 ? "" : "s"}`;
  $("top").replaceChildren(...Object.entries(counts).map(([label, k]) => {
    const li = document.createElement("li");
    li.className = "count";
    li.textContent = `${k} × ${label}`;
    return li;
  }));
  $("timing").textContent = `${answer.ms.total.toFixed(0)} ms (decoding ${answer.ms.preprocess.toFixed(0)} ms, ` +
    `letterbox, model and NMS ${answer.ms.inference.toFixed(0)} ms)`;
  $("result").hidden = false;
  document.body.dataset.drawn = String(n);
}

/** A segmenter's answer: the picture (or camera frame) with its label map
 * over it in the class colours, half opaque, and each class's share of the pixels. */
function showOverlay(answer, c) {
  const canvas = $("boxes"), colours = c.meta.palette || palette(c.classes.length);
  canvas.width = answer.width;
  canvas.height = answer.height;
  canvas.setAttribute("aria-label", "the image with each pixel's class coloured over it");
  const rgba = overlay(answer.rgb, answer.labels, colours, 0.5);
  canvas.getContext("2d").putImageData(new ImageData(rgba, answer.width, answer.height), 0, 0);
  $("preview").hidden = true;
  canvas.hidden = false;
  const n = answer.classes.length;
  $("label").textContent = `${n} class${n === 1 ? "" : "es"} in the picture`;
  $("top").replaceChildren(...answer.classes.map(({ label, share }) => {
    const li = document.createElement("li");
    li.className = "row";
    li.innerHTML = '<span class="cls"></span><span><span class="bar"></span></span><span class="score"></span>';
    li.querySelector(".cls").textContent = label;
    const bar = li.querySelector(".bar");
    bar.style.width = `${(share * 100).toFixed(1)}%`;
    bar.style.display = "block"; // a sized bar in the class's overlay colour
    bar.style.border = "1px solid #8c959f";
    bar.style.background = `rgb(${colours[c.classes.indexOf(label)].join(",")})`;
    li.querySelector(".score").textContent = `${(share * 100).toFixed(1)}%`;
    return li;
  }));
  $("timing").textContent = `${answer.ms.total.toFixed(0)} ms (decoding ${answer.ms.preprocess.toFixed(0)} ms, ` +
    `resize, model and argmax ${answer.ms.inference.toFixed(0)} ms)`;
  $("result").hidden = false;
  document.body.dataset.drawn = String(n);
}

async function classify(source, previewUrl, name) {
  status(`classifying ${name}…`);
  try {
    const c = await ready;
    if (c.meta.task === "detect") {
      const found = await c.detect(source);
      window.imgclfLast = found; // for tests and the curious: boxes, timings
      await showBoxes(found, previewUrl, c.classes);
      status(`done: ${name}`);
      return;
    }
    if (c.meta.task === "segment") {
      const found = await c.segment(source);
      window.imgclfLast = found; // for tests and the curious: labels, class shares, timings
      showOverlay(found, c);
      status(`done: ${name}`);
      return;
    }
    const answer = await c.classify(source, TOP_K);
    window.imgclfLast = answer; // for tests and the curious: probabilities, timings
    $("preview").hidden = false;
    $("boxes").hidden = true;
    show(answer, previewUrl);
    status(`done: ${name}`);
  } catch (e) {
    status(`${name}: cannot classify this image (${e.message || e}); try a JPEG or PNG`);
  }
}

function classifyFile(file) {
  if (!file) return;
  classify(file, URL.createObjectURL(file), file.name || "image");
}

$("file").addEventListener("change", (e) => classifyFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classifyFile([...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0]);
});

// Camera: a live preview; "Classify this frame" takes the current frame's pixels.
let stream = null;
$("camera-start").addEventListener("click", async () => {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  } catch (e) {
    status(`no camera: ${e.message || e} (the page needs camera permission, and https or localhost)`);
    return;
  }
  $("video").srcObject = stream;
  await $("video").play();
  $("camera").hidden = false;
});
$("capture").addEventListener("click", () => {
  const v = $("video");
  if (!v.videoWidth) return;
  const img = pixels(v, v.videoWidth, v.videoHeight);
  const c = Object.assign(document.createElement("canvas"), { width: v.videoWidth, height: v.videoHeight });
  c.getContext("2d").drawImage(v, 0, 0);
  classify(img, c.toDataURL("image/jpeg", 0.8), "camera frame");
});
$("camera-stop").addEventListener("click", () => {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("camera").hidden = true;
});

// Offline: the service worker keeps the page, the model and the runtime.
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("sw.js").then(() => navigator.serviceWorker.ready).then(() => {
    $("offline").textContent = "Saved on this device: works offline; install it from the browser's menu.";
    document.body.dataset.offlineReady = "1";
  }).catch((e) => { $("offline").textContent = `offline use unavailable (${e.message || e})`; });
}
