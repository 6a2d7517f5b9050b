// The browser half of imgclf/data/preprocess.py: decoded pixels -> the uint8
// (S, S, 3) model input, computed exactly as Python computes it.
//
// A canvas drawImage() cannot do that: browsers resize with their own filters.
// So this file re-implements, with the same integer arithmetic, the parts of
// Pillow that Preprocess.load runs after decoding:
//   - Image.resize with a box and reducing_gap (libImaging/Resample.c:
//     separable convolution, filter support widened by the downscale factor,
//     coefficients in fixed point with 22 fractional bits, rounding and clipping)
//   - Image.reduce (libImaging/Reduce.c: box average, fixed-point multiplier)
//   - imgclf's resize policies (crop / squash / pad) and the JPEG draft + shrink
//     steps of imgclf/data/images.py.
// tests/test_web_export.py checks it byte-for-byte against Pillow in Chromium.
//
// Images here are {width, height, data: Uint8Array of packed RGB}.

const PRECISION_BITS = 22; // Resample.c: 32 bits - 8 for the result - 2 for overflow
const ONE = 1 << PRECISION_BITS;

export const FILTERS = {
  bilinear: { support: 1.0, f: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
  bicubic: {
    support: 2.0,
    f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
};

export function newImage(width, height) {
  return { width, height, data: new Uint8Array(width * height * 3) };
}

/** RGBA bytes (ImageData.data) -> RGB image. The page composites transparency
 * on white before this, as imgclf/data/images.py to_rgb does. */
export function fromRGBA(rgba, width, height) {
  const img = newImage(width, height);
  for (let i = 0, j = 0; j < img.data.length; i += 4, j += 3) {
    img.data[j] = rgba[i]; img.data[j + 1] = rgba[i + 1]; img.data[j + 2] = rgba[i + 2];
  }
  return img;
}

// Python's round(): halves to even.
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Resample.c precompute_coeffs + normalize_coeffs_8bpc. The box edges arrive
// in C as float (single precision), hence Math.fround.
function coefficients(inSize, in0, in1, outSize, filter) {
  in0 = Math.fround(in0); in1 = Math.fround(in1);
  const scale = Math.fround(in1 - in0) / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) { w[x] = filter.f((x + xmin - center + 0.5) * ss); ww += w[x]; }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    bounds[xx * 2] = xmin; bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss) {
  const v = ss >> PRECISION_BITS; // arithmetic shift, as in C
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// ImagingResampleInner: horizontal pass over the rows the vertical pass needs, then vertical.
export function resample(img, xsize, ysize, filterName, box) {
  const filter = FILTERS[filterName];
  if (!filter) throw new Error(`interpolation '${filterName}' is not supported in the browser`);
  const fbox = box.map(Math.fround);
  const needH = xsize !== img.width || fbox[0] !== 0 || fbox[2] !== xsize;
  const needV = ysize !== img.height || fbox[1] !== 0 || fbox[3] !== ysize;
  const vert = coefficients(img.height, box[1], box[3], ysize, filter);
  let src = img, y0 = 0;
  if (needH) {
    const first = vert.bounds[0];
    const last = vert.bounds[ysize * 2 - 2] + vert.bounds[ysize * 2 - 1];
    const h = coefficients(img.width, box[0], box[2], xsize, filter);
    const tmp = newImage(xsize, last - first);
    const half = 1 << (PRECISION_BITS - 1);
    for (let yy = 0; yy < tmp.height; yy++) {
      const row = (yy + first) * img.width * 3;
      for (let xx = 0; xx < xsize; xx++) {
        const xmin = h.bounds[xx * 2], xmax = h.bounds[xx * 2 + 1], k0 = xx * h.ksize;
        let s0 = half, s1 = half, s2 = half;
        for (let x = 0; x < xmax; x++) {
          const k = h.kk[k0 + x], p = row + (x + xmin) * 3;
          s0 += img.data[p] * k; s1 += img.data[p + 1] * k; s2 += img.data[p + 2] * k;
        }
        const o = (yy * xsize + xx) * 3;
        tmp.data[o] = clip8(s0); tmp.data[o + 1] = clip8(s1); tmp.data[o + 2] = clip8(s2);
      }
    }
    src = tmp; y0 = first;
  }
  if (!needV) return src === img ? { ...img, data: img.data.slice() } : src;
  const out = newImage(src.width, ysize);
  const half = 1 << (PRECISION_BITS - 1);
  for (let yy = 0; yy < ysize; yy++) {
    const ymin = vert.bounds[yy * 2] - y0, ymax = vert.bounds[yy * 2 + 1], k0 = yy * vert.ksize;
    for (let xx = 0; xx < src.width; xx++) {
      let s0 = half, s1 = half, s2 = half;
      for (let y = 0; y < ymax; y++) {
        const k = vert.kk[k0 + y], p = ((y + ymin) * src.width + xx) * 3;
        s0 += src.data[p] * k; s1 += src.data[p + 1] * k; s2 += src.data[p + 2] * k;
      }
      const o = (yy * src.width + xx) * 3;
      out.data[o] = clip8(s0); out.data[o + 1] = clip8(s1); out.data[o + 2] = clip8(s2);
    }
  }
  return out;
}

// Reduce.c division_UINT32: a float (single precision) division, truncated.
function multiplier(count) {
  return Math.trunc(Math.fround(Math.fround(4294967296) / Math.fround(256 * count)));
}

/** Image.reduce((fx, fy), box): each output pixel the rounded mean of an
 * fx x fy block of box (partial blocks at the right and bottom edges). */
export function reduce(img, fx, fy, box = [0, 0, img.width, img.height]) {
  const [bx, by] = box, bw = box[2] - box[0], bh = box[3] - box[1];
  const out = newImage(Math.ceil(bw / fx), Math.ceil(bh / fy));
  for (let oy = 0; oy < out.height; oy++) {
    const ya = by + oy * fy, yb = Math.min(ya + fy, by + bh);
    for (let ox = 0; ox < out.width; ox++) {
      const xa = bx + ox * fx, xb = Math.min(xa + fx, bx + bw);
      const count = (xb - xa) * (yb - ya), m = multiplier(count), amend = Math.floor(count / 2);
      let s0 = amend, s1 = amend, s2 = amend;
      for (let y = ya; y < yb; y++) {
        for (let x = xa, p = (y * img.width + xa) * 3; x < xb; x++, p += 3) {
          s0 += img.data[p]; s1 += img.data[p + 1]; s2 += img.data[p + 2];
        }
      }
      const o = (oy * out.width + ox) * 3;
      // (ss * multiplier) >> 24 in UINT32: the product stays below 2^32, exact in a double.
      out.data[o] = Math.floor(s0 * m / 16777216);
      out.data[o + 1] = Math.floor(s1 * m / 16777216);
      out.data[o + 2] = Math.floor(s2 * m / 16777216);
    }
  }
  return out;
}

const SUPPORT = { bilinear: 1.0, bicubic: 2.0 }; // Image._filters_support

/** Image.resize(size, filter, box, reducing_gap). */
export function resize(img, w, h, filter, box = null, reducingGap = null) {
  box = box || [0, 0, img.width, img.height];
  if (w === img.width && h === img.height && box[0] === 0 && box[1] === 0 && box[2] === img.width &&
      box[3] === img.height) {
    return { ...img, data: img.data.slice() };
  }
  if (reducingGap !== null) {
    const fx = Math.trunc((box[2] - box[0]) / w / reducingGap) || 1;
    const fy = Math.trunc((box[3] - box[1]) / h / reducingGap) || 1;
    if (fx > 1 || fy > 1) {
      // Image._get_safe_box: the box widened by the filter's reach.
      const sx = (SUPPORT[filter] - 0.5) * (box[2] - box[0]) / w;
      const sy = (SUPPORT[filter] - 0.5) * (box[3] - box[1]) / h;
      const rb = [Math.max(0, Math.trunc(box[0] - sx)), Math.max(0, Math.trunc(box[1] - sy)),
        Math.min(img.width, Math.ceil(box[2] + sx)), Math.min(img.height, Math.ceil(box[3] + sy))];
      img = reduce(img, fx, fy, rb);
      box = [(box[0] - rb[0]) / fx, (box[1] - rb[1]) / fy, (box[2] - rb[0]) / fx, (box[3] - rb[1]) / fy];
    }
  }
  return resample(img, w, h, filter, box);
}

function crop(img, left, top, w, h) {
  const out = newImage(w, h);
  for (let y = 0; y < h; y++) {
    const s = ((y + top) * img.width + left) * 3;
    out.data.set(img.data.subarray(s, s + w * 3), y * w * 3);
  }
  return out;
}

export function draftSize(pp) {
  return pp.resize === "crop" ? roundHalfEven(pp.size / pp.crop_pct) : pp.size;
}

/** preprocess.py resize_image: an RGB image -> pp.size x pp.size by pp.resize. */
export function resizeImage(img, pp) {
  const s = pp.size, f = pp.interpolation, w = img.width, h = img.height;
  if (pp.resize === "squash") return resize(img, s, s, f, null, 3.0);
  if (pp.resize === "pad") {
    const r = s / Math.max(w, h);
    const nw = Math.max(1, roundHalfEven(w * r)), nh = Math.max(1, roundHalfEven(h * r));
    const out = newImage(s, s);
    for (let i = 0; i < out.data.length; i += 3) out.data.set(pp.pad_color, i);
    const small = resize(img, nw, nh, f, null, 3.0);
    const left = Math.floor((s - nw) / 2), top = Math.floor((s - nh) / 2);
    for (let y = 0; y < nh; y++) {
      out.data.set(small.data.subarray(y * nw * 3, (y + 1) * nw * 3), ((y + top) * s + left) * 3);
    }
    return out;
  }
  const short = draftSize(pp);
  const r = short / Math.min(w, h);
  const nw = Math.max(short, roundHalfEven(w * r)), nh = Math.max(short, roundHalfEven(h * r));
  if (Math.max(nw, nh) > 8 * short) { // extreme aspect ratio: centre square in source coordinates
    const side = Math.min(w, h) * s / short;
    const left = (w - side) / 2, top = (h - side) / 2;
    return resize(img, s, s, f, [left, top, left + side, top + side], 3.0);
  }
  const big = resize(img, nw, nh, f, null, 3.0);
  return crop(big, Math.floor((nw - s) / 2), Math.floor((nh - s) / 2), s, s);
}

/** Pillow's JPEG draft scale for images.py open_image: the largest of 8, 4, 2, 1
 * keeping both sides >= draft size (JpegImagePlugin.draft). */
export function jpegDraftScale(width, height, draft) {
  const scale = Math.min(Math.floor(width / draft), Math.floor(height / draft));
  for (const s of [8, 4, 2]) if (scale >= s) return s;
  return 1;
}

/** images.py shrink: box-reduce by an integer factor when far larger than needed. */
export function shrink(img, draft) {
  const factor = Math.floor(Math.min(img.width, img.height) / (2 * draft));
  return factor < 2 ? img : reduce(img, factor, factor);
}
