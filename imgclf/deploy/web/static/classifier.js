// An imgclf model in the browser: decode an image, preprocess it exactly as
// imgclf does in Python (preprocess.js), run the exported ONNX graph (uint8
// NHWC in, calibrated probabilities out) with ONNX Runtime Web, answer top-k.
//
//   import { loadClassifier } from "./classifier.js";
//   const clf = await loadClassifier("./");            // folder of model.onnx + model.json
//   const { top } = await clf.classify(fileOrBlob, 3);  // [{label, score}, ...]
import * as ort from "./ort/ort.wasm.min.mjs";
import { decodeJpegScaled, orient } from "./jpeg.js";
import { draftSize, fromRGBA, jpegDraftScale, reduce, resizeImage, shrink } from "./preprocess.js";

const MAX_PIXELS = 100_000_000; // imgclf/data/images.py MAX_PIXELS: Python refuses bigger images too

function isJpeg(bytes) {
  return bytes.length > 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff;
}

function canvas(w, h) {
  if (typeof OffscreenCanvas !== "undefined") return new OffscreenCanvas(w, h);
  return Object.assign(document.createElement("canvas"), { width: w, height: h });
}

/** Any drawable (ImageBitmap, video frame, canvas) -> RGB pixels, transparency
 * on white as imgclf/data/images.py to_rgb does. */
export function pixels(source, width, height) {
  const c = canvas(width, height);
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(source, 0, 0, width, height);
  return fromRGBA(ctx.getImageData(0, 0, width, height).data, width, height);
}

/** A file or blob -> RGB pixels as images.py open_image delivers them: decoded
 * without colour management (Pillow applies none), upright by EXIF
 * orientation, big JPEGs at Pillow's draft scale, far larger images shrunk.
 * `exact` is false only for the rare JPEGs jpeg.js cannot decode (CMYK,
 * arithmetic-coded): those are approximated by a block mean of the full decode. */
export async function decode(blob, pp) {
  const bitmap = await createImageBitmap(blob, {
    colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image",
  });
  if (bitmap.width * bitmap.height > MAX_PIXELS) {
    bitmap.close();
    throw new Error(`${bitmap.width}x${bitmap.height} pixels is over the limit of ${MAX_PIXELS / 1e6} MP`);
  }
  const draft = draftSize(pp), s = jpegDraftScale(bitmap.width, bitmap.height, draft);
  let img = null, exact = true;
  if (s > 1) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    if (isJpeg(bytes)) {
      const scaled = decodeJpegScaled(bytes, s);
      if (scaled) img = orient(scaled, scaled.orientation);
      else { img = reduce(pixels(bitmap, bitmap.width, bitmap.height), s, s); exact = false; }
    }
  }
  img = img || pixels(bitmap, bitmap.width, bitmap.height);
  bitmap.close();
  return { img: shrink(img, draft), exact };
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

  /** RGB pixels (any size) -> the (S, S, 3) model input. */
  const prepare = (img) => resizeImage(img, pp);

  /** (S, S, 3) inputs -> per image {probs, unknown, rejected, selected}: the
   * graph's outputs (inference/onnx_predictor.py names them); the last three
   * only for models with an unknown-input scorer / multi-label models. */
  async function outputs(inputs) {
    const s = pp.size, batch = new Uint8Array(inputs.length * s * s * 3);
    inputs.forEach((x, i) => batch.set(x.data, i * s * s * 3));
    const out = await session.run({ [input]: new ort.Tensor("uint8", batch, [inputs.length, s, s, 3]) });
    const c = classes.length, row = (name, i, w) => (out[name] ? out[name].data.slice(i * w, (i + 1) * w) : null);
    return inputs.map((_, i) => ({
      probs: row("probs", i, c), unknown: out.unknown ? out.unknown.data[i] : null,
      rejected: out.rejected ? Boolean(out.rejected.data[i]) : false, selected: row("selected", i, c),
    }));
  }

  /** (S, S, 3) inputs -> calibrated probabilities, one Float32Array per image. */
  const probs = async (inputs) => (await outputs(inputs)).map((o) => o.probs);

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
    // Pixels (a camera frame) go straight to the resize, as an array does in Python.
    const { img, exact } = source instanceof Blob ? await decode(source, pp) : { img: source, exact: true };
    const x = prepare(img);
    const t1 = performance.now();
    const [o] = await outputs([x]);
    const t2 = performance.now();
    return { ...topK(o, k), probs: Array.from(o.probs), input: x, exact,
      ms: { preprocess: t1 - t0, inference: t2 - t1, total: t2 - t0 } };
  }

  // One run on a blank image: the wasm's first call is several times slower
  // (bench/bench_web.py), better spent while the page says "loading".
  if (options.warmUp !== false) await probs([{ data: new Uint8Array(pp.size * pp.size * 3) }]);
  return { meta, classes, preprocess: pp, session, prepare, outputs, probs, topK, classify };
}
