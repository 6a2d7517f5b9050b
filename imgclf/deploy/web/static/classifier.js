// An imgclf model in the browser: decode an image at its own size, run the
// exported any-size ONNX graph (uint8 NHWC photo in; imgclf's resize policy,
// normalisation and calibrated probabilities inside) with ONNX Runtime Web,
// answer top-k. The resize is in the graph (imgclf/deploy/resize_graph.py), so
// this page and Python resize with the same arithmetic.
//
//   import { loadClassifier } from "./classifier.js";
//   const clf = await loadClassifier("./");            // folder of model.onnx + model.json
//   const { top } = await clf.classify(fileOrBlob, 3);  // [{label, score}, ...]
//   const { boxes } = await clf.detect(fileOrBlob);     // a detector: [{label, score, box: [x1, y1, x2, y2]}, ...]
//   const { labels, classes } = await clf.segment(fileOrBlob); // a segmenter: class ids per pixel, shares
import * as ort from "./ort/ort.wasm.min.mjs";

const MAX_PIXELS = 100_000_000; // imgclf/data/images.py MAX_PIXELS: Python refuses bigger images too

function canvas(w, h) {
  if (typeof OffscreenCanvas !== "undefined") return new OffscreenCanvas(w, h);
  return Object.assign(document.createElement("canvas"), { width: w, height: h });
}

/** Any drawable (ImageBitmap, video frame, canvas) at its own size -> packed RGB
 * {width, height, data}, transparency on white as imgclf/data/images.py to_rgb does. */
export function pixels(source, width, height) {
  const c = canvas(width, height);
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(source, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data, data = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; j < data.length; i += 4, j += 3) {
    data[j] = rgba[i]; data[j + 1] = rgba[i + 1]; data[j + 2] = rgba[i + 2];
  }
  return { width, height, data };
}

/** A file or blob -> RGB pixels at full size, upright by EXIF orientation,
 * without colour management (Pillow applies none). */
export async function decode(blob) {
  const bitmap = await createImageBitmap(blob, {
    colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image",
  });
  try {
    if (bitmap.width * bitmap.height > MAX_PIXELS) {
      throw new Error(`${bitmap.width}x${bitmap.height} pixels is over the limit of ${MAX_PIXELS / 1e6} MP`);
    }
    return pixels(bitmap, bitmap.width, bitmap.height);
  } finally {
    bitmap.close();
  }
}

/** n colours, one per class: Pascal VOC's bit-interleaved palette from its
 * second entry (black is void's), as imgclf/tasks/segment/predictor.py palette
 * (the export's metadata has them too). */
export function palette(n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    let c = i + 1, r = 0, g = 0, b = 0;
    for (let j = 0; j < 8; j++) {
      r |= ((c >> 0) & 1) << (7 - j); g |= ((c >> 1) & 1) << (7 - j); b |= ((c >> 2) & 1) << (7 - j);
      c >>= 3;
    }
    out.push([r, g, b]);
  }
  return out;
}

/** A label map over its picture: RGBA pixels (for ImageData), each class's
 * colour blended at `alpha` over the packed RGB picture, other ids (void)
 * left clear; predictor.py overlay computes the same. */
export function overlay(rgb, labels, colours, alpha = 0.5) {
  const out = new Uint8ClampedArray(labels.length * 4);
  for (let p = 0; p < labels.length; p++) {
    const col = colours[labels[p]], a = col ? alpha : 0;
    for (let ch = 0; ch < 3; ch++) {
      out[4 * p + ch] = Math.round(rgb[3 * p + ch] * (1 - a) + (col ? col[ch] : 0) * a);
    }
    out[4 * p + 3] = 255;
  }
  return out;
}

export async function loadClassifier(base = "./", options = {}) {
  const root = new URL(base, typeof document !== "undefined" ? document.baseURI : self.location.href);
  const meta = await (await fetch(new URL("model.json", root))).json();
  ort.env.wasm.wasmPaths = new URL("ort/", root).href;
  // One thread: threads need SharedArrayBuffer, i.e. cross-origin isolation
  // headers that plain static hosts do not send.
  ort.env.wasm.numThreads = options.numThreads || 1;
  const session = await ort.InferenceSession.create(new URL("model.onnx", root).href, {
    executionProviders: ["wasm"], graphOptimizationLevel: "all",
  });
  const pp = meta.preprocess, classes = meta.classes, input = session.inputNames[0];

  /** RGB images of any size -> per image {probs, unknown, rejected, selected}:
   * the graph's outputs (inference/onnx_predictor.py names them); the last
   * three only for models with an unknown-input scorer / multi-label models. */
  async function outputs(images) {
    const answers = [];
    for (const img of images) { // one at a time: each has its own size
      const x = new ort.Tensor("uint8", img.data, [1, img.height, img.width, 3]);
      const out = await session.run({ [input]: x });
      const row = (name) => (out[name] ? out[name].data.slice() : null);
      answers.push({ probs: row("probs"), unknown: out.unknown ? out.unknown.data[0] : null,
        rejected: out.rejected ? Boolean(out.rejected.data[0]) : false, selected: row("selected") });
    }
    return answers;
  }

  /** RGB images -> calibrated probabilities, one Float32Array per image. */
  const probs = async (images) => (await outputs(images)).map((o) => o.probs);

  /** inference/__init__.py top_k: the k best, highest first, ties in class
   * order; multi-label: every selected label; "unknown" when rejected. */
  function topK({ probs: p, unknown = null, rejected = false, selected = null }, k = 5) {
    const order = [...p.keys()].sort((a, b) => p[b] - p[a]);
    const best = order.slice(0, Math.max(1, Math.min(k, classes.length)));
    const out = { label: classes[best[0]], score: p[best[0]],
      top: best.map((j) => ({ label: classes[j], score: p[j] })) };
    if (selected) {
      const on = order.filter((j) => selected[j]);
      out.labels = on.map((j) => ({ label: classes[j], score: p[j] }));
      out.label = on.map((j) => classes[j]).join(";");
    }
    if (unknown !== null) {
      out.unknown = unknown;
      if (rejected) { out.label = "unknown"; out.score = unknown; if (selected) out.labels = []; }
    }
    return out;
  }

  /** A File/Blob, or an {width, height, data} RGB image (e.g. a camera frame) -> top-k answer. */
  async function classify(source, k = 5) {
    const t0 = performance.now();
    const img = source instanceof Blob ? await decode(source) : source;
    const t1 = performance.now();
    const [o] = await outputs([img]);
    const t2 = performance.now();
    return { ...topK(o, k), probs: Array.from(o.probs), size: [img.width, img.height],
      ms: { preprocess: t1 - t0, inference: t2 - t1, total: t2 - t0 } }; // decode; resize + model
  }

  /** A detector's graph (tasks/detect/export.py: letterbox, network and NMS
   * inside): a File/Blob or RGB image -> {boxes: [{label, score, box}], width,
   * height}, the detections its `selected` output keeps (at or above their
   * class's threshold), best first, boxes in the image's own pixels. */
  async function detect(source) {
    const t0 = performance.now();
    const img = source instanceof Blob ? await decode(source) : source;
    const t1 = performance.now();
    const out = await session.run({ [input]: new ort.Tensor("uint8", img.data, [1, img.height, img.width, 3]) });
    const t2 = performance.now();
    const b = out.boxes.data, s = out.scores.data, l = out.labels.data, sel = out.selected.data;
    const boxes = [];
    for (let i = 0; i < s.length; i++) {
      if (sel[i]) boxes.push({ label: classes[Number(l[i])], score: s[i], box: Array.from(b.slice(4 * i, 4 * i + 4)) });
    }
    return { boxes, width: img.width, height: img.height, ms: { preprocess: t1 - t0, inference: t2 - t1, total: t2 - t0 } };
  }

  /** A segmenter's graph (tasks/segment/export.py: the resize, network and
   * argmax inside): a File/Blob or RGB image -> {labels: Uint8Array of class
   * ids, row by row, at the image's own size (no resize back needed), classes:
   * [{label, share}] largest first, width, height, rgb: the picture's pixels}. */
  async function segment(source) {
    const t0 = performance.now();
    const img = source instanceof Blob ? await decode(source) : source;
    const t1 = performance.now();
    const out = await session.run({ [input]: new ort.Tensor("uint8", img.data, [1, img.height, img.width, 3]) });
    const t2 = performance.now();
    const labels = out.labels.data, counts = new Array(classes.length).fill(0);
    for (let p = 0; p < labels.length; p++) if (labels[p] < classes.length) counts[labels[p]]++;
    const shares = counts.map((n, j) => ({ label: classes[j], share: n / Math.max(1, labels.length) }))
      .filter((c) => c.share > 0).sort((a, b) => b.share - a.share);
    return { labels, classes: shares, width: img.width, height: img.height, rgb: img.data,
      ms: { preprocess: t1 - t0, inference: t2 - t1, total: t2 - t0 } };
  }

  // One run on a blank image: the wasm's first call is several times slower
  // (bench/bench_web.py), better spent while the page says "loading".
  if (options.warmUp !== false) {
    await probs([{ width: pp.size, height: pp.size, data: new Uint8Array(pp.size * pp.size * 3) }]);
  }
  return { meta, classes, preprocess: pp, session, outputs, probs, topK, classify, detect, segment };
}
