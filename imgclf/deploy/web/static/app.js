// The page: pick, drop or photograph an image; show the model's top-k with scores.
import { loadClassifier, pixels } from "./classifier.js";

const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; };
const TOP_K = 5;
let clf = null;
const ready = loadClassifier("./").then((c) => {
  clf = c;
  const m = c.meta, acc = m.metrics && m.metrics.accuracy;
  document.title = `imgclf: ${c.classes.join(", ")}`.slice(0, 80);
  $("model-info").textContent = `${m.arch}, ${c.classes.length} classes (${c.classes.join(", ")}), ` +
    `${m.input_size} px ${m.resize}` + (acc !== undefined ? `, held-out accuracy ${(acc * 100).toFixed(1)}%` : "");
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

async function classify(source, previewUrl, name) {
  status(`classifying ${name}…`);
  try {
    const c = await ready;
    const answer = await c.classify(source, TOP_K);
    window.imgclfLast = answer; // for tests and the curious: probabilities, timings
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
