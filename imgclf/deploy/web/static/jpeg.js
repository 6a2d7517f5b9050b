// A JPEG decoder for one job: Pillow's "draft" decoding of big JPEGs at 1/2,
// 1/4 or 1/8 scale, reproduced exactly.
//
// imgclf/data/images.py opens JPEGs with img.draft(), so libjpeg-turbo decodes
// them with its scaled inverse DCTs (jidctred.c: 4x4, 2x2 and 1x1 outputs per
// 8x8 block; jidctint.c's 8x8 for chroma scaled up instead of upsampled). A
// browser always decodes at full size, and no resampling of that equals a
// scaled IDCT (measured: up to 14 levels off, 1.4e-2 in probability). So this
// file decodes the entropy-coded data itself (baseline and progressive
// Huffman) and repeats libjpeg-turbo's integer arithmetic: the IDCTs, the
// per-component scaling choice and upsampling of jdmaster.c/jdsample.c, the
// YCbCr->RGB tables of jdcolor.c. Full-size decodes stay with the browser,
// whose libjpeg-turbo output is already identical to Pillow's.
// Unsupported here (returns null; the caller falls back to an approximation):
// arithmetic coding, 12-bit, lossless, CMYK/YCCK.

const ZIGZAG = new Int32Array([
  0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
  28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61,
  54, 47, 55, 62, 63]);

class Unsupported extends Error {}

function huffmanTable(counts, symbols) {
  // Canonical codes, as jdhuff.c jpeg_make_d_derived_tbl: per length, the
  // largest code and where its symbols start.
  const maxcode = new Int32Array(18).fill(-1), valoffset = new Int32Array(18);
  let code = 0, k = 0;
  for (let l = 1; l <= 16; l++) {
    valoffset[l] = k - code;
    code += counts[l - 1]; k += counts[l - 1];
    maxcode[l] = counts[l - 1] ? code - 1 : -1;
    code <<= 1;
  }
  return { maxcode, valoffset, symbols };
}

class BitReader {
  constructor(data, pos) { this.data = data; this.pos = pos; this.buf = 0; this.bits = 0; }
  bit() {
    if (this.bits === 0) {
      const d = this.data;
      let b = 0;
      if (this.pos < d.length && !(d[this.pos] === 0xff && d[this.pos + 1] !== 0)) {
        b = d[this.pos++];
        if (b === 0xff) this.pos++; // stuffed zero byte
      } // at a marker: libjpeg feeds zeros
      this.buf = b; this.bits = 8;
    }
    this.bits--;
    return (this.buf >> this.bits) & 1;
  }
  receive(n) { let v = 0; while (n--) v = (v << 1) | this.bit(); return v; }
  extend(n) {
    if (n === 0) return 0;
    const v = this.receive(n);
    return v < 1 << (n - 1) ? v - (1 << n) + 1 : v;
  }
  decode(t) {
    let code = 0;
    for (let l = 1; l <= 16; l++) {
      code = (code << 1) | this.bit();
      if (code <= t.maxcode[l]) return t.symbols[t.valoffset[l] + code];
    }
    return 0; // corrupt data: libjpeg warns and uses 0
  }
  restart() {
    this.bits = 0;
    const d = this.data;
    while (this.pos + 1 < d.length && !(d[this.pos] === 0xff && d[this.pos + 1] >= 0xd0 && d[this.pos + 1] <= 0xd7)) {
      if (d[this.pos] === 0xff && d[this.pos + 1] !== 0) return; // another marker: let the scan end
      this.pos++;
    }
    this.pos += 2;
  }
}

function parse(data) {
  if (data[0] !== 0xff || data[1] !== 0xd8) throw new Unsupported("not a JPEG");
  const f = { qt: [], dc: [], ac: [], restart: 0, adobe: null, jfif: false, orientation: 1, frame: null, scans: 0 };
  let pos = 2;
  while (pos < data.length) {
    if (data[pos] !== 0xff) { pos++; continue; }
    const m = data[pos + 1];
    if (m === 0xff) { pos++; continue; }
    pos += 2;
    if (m === 0xd8 || (m >= 0xd0 && m <= 0xd7) || m === 0x01) continue; // no length
    if (m === 0xd9) break;
    const end = pos + ((data[pos] << 8) | data[pos + 1]), p = pos + 2;
    if (m === 0xda) { pos = decodeScan(data, end, f, readScanHeader(data, p, f)); f.scans++; continue; }
    readSegment(m, data, p, end, f);
    pos = end;
  }
  if (!f.frame || !f.scans) throw new Unsupported("no image data");
  return f;
}

const text = (data, p, n) => String.fromCharCode(...data.subarray(p, p + n));

function readSegment(m, data, p, end, f) {
  if (m === 0xc0 || m === 0xc1 || m === 0xc2) f.frame = readFrame(data, p, m === 0xc2);
  else if (m >= 0xc3 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) {
    throw new Unsupported("arithmetic, lossless or hierarchical JPEG");
  } else if (m === 0xc4) readHuffman(data, p, end, f);
  else if (m === 0xdb) readQuant(data, p, end, f);
  else if (m === 0xdd) f.restart = (data[p] << 8) | data[p + 1];
  else if (m === 0xe0 && text(data, p, 4) === "JFIF") f.jfif = true;
  else if (m === 0xee && text(data, p, 5) === "Adobe") f.adobe = data[p + 11];
  else if (m === 0xe1 && text(data, p, 4) === "Exif" && f.orientation === 1) {
    f.orientation = exifOrientation(data, p + 6, end);
  }
}

function readFrame(data, p, progressive) {
  if (data[p] !== 8) throw new Unsupported(`${data[p]}-bit JPEG`);
  const height = (data[p + 1] << 8) | data[p + 2], width = (data[p + 3] << 8) | data[p + 4], comps = [];
  if (!height) throw new Unsupported("DNL-defined height");
  for (let i = 0, q = p + 6; i < data[p + 5]; i++, q += 3) {
    comps.push({ id: data[q], h: data[q + 1] >> 4, v: data[q + 1] & 15, tq: data[q + 2] });
  }
  const frame = { progressive, width, height, comps };
  setupComponents(frame);
  return frame;
}

function readHuffman(data, p, end, f) {
  for (let q = p; q < end;) {
    const tc = data[q] >> 4, th = data[q] & 15, counts = data.subarray(q + 1, q + 17);
    const total = counts.reduce((a, b) => a + b, 0);
    (tc ? f.ac : f.dc)[th] = huffmanTable(counts, data.slice(q + 17, q + 17 + total));
    q += 17 + total;
  }
}

function readQuant(data, p, end, f) {
  for (let q = p; q < end;) {
    const pq = data[q] >> 4, table = new Int32Array(64);
    for (let i = 0; i < 64; i++) {
      table[ZIGZAG[i]] = pq ? (data[q + 1 + 2 * i] << 8) | data[q + 2 + 2 * i] : data[q + 1 + i];
    }
    f.qt[data[q] & 15] = table;
    q += 1 + (pq ? 128 : 64);
  }
}

function readScanHeader(data, p, f) {
  if (!f.frame) throw new Unsupported("scan before frame header");
  const n = data[p], comps = [];
  for (let i = 0; i < n; i++) {
    const c = f.frame.comps.find((x) => x.id === data[p + 1 + 2 * i]);
    if (!c) throw new Unsupported("scan of an unknown component");
    c.dcTable = f.dc[data[p + 2 + 2 * i] >> 4]; c.acTable = f.ac[data[p + 2 + 2 * i] & 15];
    comps.push(c);
  }
  const q = p + 1 + 2 * n;
  return { comps, ss: data[q], se: data[q + 1], ah: data[q + 2] >> 4, al: data[q + 2] & 15 };
}

function exifOrientation(d, t, end) {
  // TIFF header, IFD0, tag 0x0112 (what ImageOps.exif_transpose reads).
  if (t + 8 > end) return 1;
  const le = d[t] === 0x49;
  const u16 = (o) => (le ? d[o] | (d[o + 1] << 8) : (d[o] << 8) | d[o + 1]);
  const u32 = (o) => (le ? u16(o) + u16(o + 2) * 65536 : u16(o) * 65536 + u16(o + 2));
  const ifd = t + u32(t + 4);
  if (ifd + 2 > end) return 1;
  for (let i = 0, n = u16(ifd); i < n && ifd + 2 + i * 12 + 12 <= end; i++) {
    const e = ifd + 2 + i * 12;
    if (u16(e) === 0x0112) { const v = u16(e + 8); return v >= 1 && v <= 8 ? v : 1; }
  }
  return 1;
}

function setupComponents(fr) {
  fr.hmax = Math.max(...fr.comps.map((c) => c.h)); fr.vmax = Math.max(...fr.comps.map((c) => c.v));
  fr.mcusPerLine = Math.ceil(fr.width / (8 * fr.hmax));
  fr.mcusPerColumn = Math.ceil(fr.height / (8 * fr.vmax));
  for (const c of fr.comps) {
    c.blocksPerLine = Math.ceil(Math.ceil((fr.width * c.h) / fr.hmax) / 8);
    c.blocksPerColumn = Math.ceil(Math.ceil((fr.height * c.v) / fr.vmax) / 8);
    c.stride = fr.mcusPerLine * c.h; // blocks per stored row
    c.coefs = new Int16Array(c.stride * fr.mcusPerColumn * c.v * 64);
    c.pred = 0;
  }
}

function decodeScan(data, pos, f, scan) {
  const fr = f.frame, r = new BitReader(data, pos), { ss, se, ah, al } = scan;
  let eobrun = 0, state = 0, next = 0, run = 0;

  function baseline(c, o) {
    const t = r.decode(c.dcTable);
    c.pred += t ? r.extend(t) : 0;
    c.coefs[o] = c.pred;
    for (let k = 1; k < 64;) {
      const rs = r.decode(c.acTable), s = rs & 15, n = rs >> 4;
      if (!s) { if (n < 15) break; k += 16; continue; }
      k += n;
      if (k > 63) break;
      c.coefs[o + ZIGZAG[k++]] = r.extend(s);
    }
  }
  function dcFirst(c, o) {
    const t = r.decode(c.dcTable);
    c.pred += t ? r.extend(t) : 0;
    c.coefs[o] = c.pred * (1 << al);
  }
  function dcRefine(c, o) { if (r.bit()) c.coefs[o] |= 1 << al; }
  function acFirst(c, o) {
    if (eobrun > 0) { eobrun--; return; }
    for (let k = ss; k <= se;) {
      const rs = r.decode(c.acTable), s = rs & 15, n = rs >> 4;
      if (!s) {
        if (n < 15) { eobrun = r.receive(n) + (1 << n) - 1; break; }
        k += 16; continue;
      }
      k += n;
      if (k > 63) break;
      c.coefs[o + ZIGZAG[k++]] = r.extend(s) * (1 << al);
    }
  }
  function acRefine(c, o) {
    // T.81 G.1.2.3 as a state machine: 0 read, 1/2 skip zeros (ZRL / before a value),
    // 3 place the new value at the next zero, 4 inside an end-of-band run.
    const p1 = 1 << al, m1 = -1 << al;
    for (let k = ss; k <= se; k++) {
      const z = o + ZIGZAG[k], v = c.coefs[z];
      if (state === 0) {
        const rs = r.decode(c.acTable), s = rs & 15;
        run = rs >> 4;
        if (!s) {
          if (run < 15) { eobrun = r.receive(run) + (1 << run); state = 4; } else { run = 16; state = 1; }
        } else {
          next = r.bit() ? p1 : m1;
          state = run ? 2 : 3;
        }
        k--; continue; // the same coefficient, in the new state
      }
      if (v) {
        if (r.bit() && (v & p1) === 0) c.coefs[z] = v + (v >= 0 ? p1 : m1);
      } else if (state === 1 || state === 2) {
        if (--run === 0) state = state === 2 ? 3 : 0;
      } else if (state === 3) {
        c.coefs[z] = next; state = 0;
      }
    }
    if (state === 4 && --eobrun === 0) state = 0;
  }
  const progressive = fr.progressive;
  const fn = !progressive ? baseline : ss === 0 ? (ah ? dcRefine : dcFirst) : ah ? acRefine : acFirst;
  if (progressive && ss === 0 && se !== 0) throw new Unsupported("bad progressive scan");
  const block = (c, row, col) => (row * c.stride + col) * 64;
  const single = scan.comps.length === 1;
  const c0 = scan.comps[0];
  const total = single ? c0.blocksPerLine * c0.blocksPerColumn : fr.mcusPerLine * fr.mcusPerColumn;
  for (const c of scan.comps) c.pred = 0;
  for (let m = 0; m < total; m++) {
    if (f.restart && m > 0 && m % f.restart === 0) {
      r.restart();
      for (const c of scan.comps) c.pred = 0;
      eobrun = 0; state = 0;
    }
    if (single) {
      fn(c0, block(c0, Math.floor(m / c0.blocksPerLine), m % c0.blocksPerLine));
    } else {
      const mr = Math.floor(m / fr.mcusPerLine), mc = m % fr.mcusPerLine;
      for (const c of scan.comps) {
        for (let v = 0; v < c.v; v++) for (let h = 0; h < c.h; h++) fn(c, block(c, mr * c.v + v, mc * c.h + h));
      }
    }
  }
  // Continue after the scan's data: the next marker that is not a restart.
  let p = r.pos;
  const isMarker = (i) => data[i] === 0xff && data[i + 1] !== 0 && !(data[i + 1] >= 0xd0 && data[i + 1] <= 0xd7);
  while (p + 1 < data.length && !isMarker(p)) p++;
  return p;
}

// jdmaster.c prepare_range_limit_table, as seen by the IDCTs: x + 128 clamped
// to 0..255, indexed by x & 1023 (so wild values wrap as they do in C).
const LIMIT = new Uint8Array(1024);
for (let i = 0; i < 1024; i++) LIMIT[i] = i < 128 ? i + 128 : i < 512 ? 255 : i < 896 ? 0 : i - 896;
const lim = (x) => LIMIT[x & 1023];
const descale = (x, n) => (x + (1 << (n - 1))) >> n;

// jidctint.c jpeg_idct_islow (CONST_BITS 13, PASS1_BITS 2).
function idct8(b, o, q, ws, out, stride, op) {
  for (let c = 0; c < 8; c++) {
    const i = (k) => b[o + k * 8 + c] * q[k * 8 + c];
    let z2 = i(2), z3 = i(6);
    let z1 = (z2 + z3) * 4433;
    const t2 = z1 + z3 * -15137, t3 = z1 + z2 * 6270;
    z2 = i(0); z3 = i(4);
    const t0 = (z2 + z3) * 8192, t1 = (z2 - z3) * 8192;
    const t10 = t0 + t3, t13 = t0 - t3, t11 = t1 + t2, t12 = t1 - t2;
    const [a0, a1, a2, a3] = odd(i(7), i(5), i(3), i(1));
    ws[c] = descale(t10 + a3, 11); ws[56 + c] = descale(t10 - a3, 11);
    ws[8 + c] = descale(t11 + a2, 11); ws[48 + c] = descale(t11 - a2, 11);
    ws[16 + c] = descale(t12 + a1, 11); ws[40 + c] = descale(t12 - a1, 11);
    ws[24 + c] = descale(t13 + a0, 11); ws[32 + c] = descale(t13 - a0, 11);
  }
  for (let rw = 0; rw < 8; rw++) {
    const w = (k) => ws[rw * 8 + k], p = op + rw * stride;
    const z2 = w(2), z3 = w(6), z1 = (z2 + z3) * 4433;
    const t2 = z1 + z3 * -15137, t3 = z1 + z2 * 6270;
    const t0 = (w(0) + w(4)) * 8192, t1 = (w(0) - w(4)) * 8192;
    const t10 = t0 + t3, t13 = t0 - t3, t11 = t1 + t2, t12 = t1 - t2;
    const [a0, a1, a2, a3] = odd(w(7), w(5), w(3), w(1));
    out[p] = lim(descale(t10 + a3, 18)); out[p + 7] = lim(descale(t10 - a3, 18));
    out[p + 1] = lim(descale(t11 + a2, 18)); out[p + 6] = lim(descale(t11 - a2, 18));
    out[p + 2] = lim(descale(t12 + a1, 18)); out[p + 5] = lim(descale(t12 - a1, 18));
    out[p + 3] = lim(descale(t13 + a0, 18)); out[p + 4] = lim(descale(t13 - a0, 18));
  }
}

function odd(t0, t1, t2, t3) {
  const z1 = t0 + t3, z2 = t1 + t2, z3 = t0 + t2, z4 = t1 + t3, z5 = (z3 + z4) * 9633;
  const y1 = z1 * -7373, y2 = z2 * -20995, y3 = z3 * -16069 + z5, y4 = z4 * -3196 + z5;
  return [t0 * 2446 + y1 + y3, t1 * 16819 + y2 + y4, t2 * 25172 + y2 + y3, t3 * 12299 + y1 + y4];
}

// jidctred.c jpeg_idct_4x4.
function idct4(b, o, q, ws, out, stride, op) {
  for (let c = 0; c < 8; c++) {
    if (c === 4) continue;
    const i = (k) => b[o + k * 8 + c] * q[k * 8 + c];
    let t0 = i(0) * 16384;
    let t2 = i(2) * 15137 + i(6) * -6270;
    const t10 = t0 + t2, t12 = t0 - t2;
    const z1 = i(7), z2 = i(5), z3 = i(3), z4 = i(1);
    t0 = z1 * -1730 + z2 * 11893 + z3 * -17799 + z4 * 8697;
    t2 = z1 * -4176 + z2 * -4926 + z3 * 7373 + z4 * 20995;
    ws[c] = descale(t10 + t2, 12); ws[24 + c] = descale(t10 - t2, 12);
    ws[8 + c] = descale(t12 + t0, 12); ws[16 + c] = descale(t12 - t0, 12);
  }
  for (let rw = 0; rw < 4; rw++) {
    const w = (k) => ws[rw * 8 + k], p = op + rw * stride;
    let t0 = w(0) * 16384;
    let t2 = w(2) * 15137 + w(6) * -6270;
    const t10 = t0 + t2, t12 = t0 - t2;
    t0 = w(7) * -1730 + w(5) * 11893 + w(3) * -17799 + w(1) * 8697;
    t2 = w(7) * -4176 + w(5) * -4926 + w(3) * 7373 + w(1) * 20995;
    out[p] = lim(descale(t10 + t2, 19)); out[p + 3] = lim(descale(t10 - t2, 19));
    out[p + 1] = lim(descale(t12 + t0, 19)); out[p + 2] = lim(descale(t12 - t0, 19));
  }
}

// jidctred.c jpeg_idct_2x2.
function idct2(b, o, q, ws, out, stride, op) {
  for (const c of [0, 1, 3, 5, 7]) {
    const i = (k) => b[o + k * 8 + c] * q[k * 8 + c];
    const t10 = i(0) * 32768;
    const t0 = i(7) * -5906 + i(5) * 6967 + i(3) * -10426 + i(1) * 29692;
    ws[c] = descale(t10 + t0, 13); ws[8 + c] = descale(t10 - t0, 13);
  }
  for (let rw = 0; rw < 2; rw++) {
    const w = (k) => ws[rw * 8 + k], p = op + rw * stride;
    const t10 = w(0) * 32768;
    const t0 = w(7) * -5906 + w(5) * 6967 + w(3) * -10426 + w(1) * 29692;
    out[p] = lim(descale(t10 + t0, 20)); out[p + 1] = lim(descale(t10 - t0, 20));
  }
}

// jidctred.c jpeg_idct_1x1: the DC coefficient / 8.
function idct1(b, o, q, ws, out, stride, op) {
  out[op] = lim(descale(b[o] * q[0], 3));
}

const IDCT = { 8: idct8, 4: idct4, 2: idct2, 1: idct1 };

/** A component's samples at its scaled size: {width, height (real samples), stride, data}. */
function componentPlane(f, c, size) {
  const fr = f.frame, q = f.qt[c.tq], idct = IDCT[size], ws = new Int32Array(64);
  if (!q) throw new Unsupported("missing quantization table");
  const rows = fr.mcusPerColumn * c.v, cols = c.stride, stride = cols * size;
  const data = new Uint8Array(rows * size * stride);
  for (let br = 0; br < rows; br++) {
    for (let bc = 0; bc < cols; bc++) {
      idct(c.coefs, (br * cols + bc) * 64, q, ws, data, stride, br * size * stride + bc * size);
    }
  }
  return {
    width: Math.ceil((fr.width * c.h * size) / (fr.hmax * 8)),
    height: Math.ceil((fr.height * c.v * size) / (fr.vmax * 8)), stride, data,
  };
}

/** jdsample.c: a plane upsampled by (rh, rv) to out (width x height). */
function upsample(pl, rh, rv, fancy, width, height) {
  const out = new Uint8Array(width * height);
  const at = (x, y) => pl.data[Math.min(y, pl.height - 1) * pl.stride + Math.min(x, pl.width - 1)];
  if (rh === 2 && rv === 1 && fancy && pl.width > 2) { // h2v1_fancy_upsample
    for (let y = 0; y < height; y++) {
      const row = new Uint8Array(pl.width * 2);
      for (let x = 0; x < pl.width; x++) {
        const v = at(x, y) * 3;
        row[2 * x] = x === 0 ? at(0, y) : (v + at(x - 1, y) + 1) >> 2;
        row[2 * x + 1] = x === pl.width - 1 ? at(x, y) : (v + at(x + 1, y) + 2) >> 2;
      }
      out.set(row.subarray(0, width), y * width);
    }
    return out;
  }
  if (rh === 1 && rv === 2 && fancy) { // h1v2_fancy_upsample (needs context rows: edges replicated)
    for (let y = 0; y < height; y++) {
      const sy = y >> 1, near = Math.max(0, Math.min(pl.height - 1, y & 1 ? sy + 1 : sy - 1)), bias = y & 1 ? 2 : 1;
      for (let x = 0; x < width; x++) out[y * width + x] = (at(x, sy) * 3 + at(x, near) + bias) >> 2;
    }
    return out;
  }
  for (let y = 0; y < height; y++) { // int_upsample / h2v1_upsample: replication
    for (let x = 0; x < width; x++) out[y * width + x] = at(Math.floor(x / rh), Math.floor(y / rv));
  }
  return out;
}

// jdcolor.c build_ycc_rgb_table (SCALEBITS 16).
const CR_R = new Int32Array(256), CB_B = new Int32Array(256), CR_G = new Int32Array(256), CB_G = new Int32Array(256);
for (let i = 0; i < 256; i++) {
  const x = i - 128, fix = (v) => Math.floor(v * 65536 + 0.5);
  CR_R[i] = (fix(1.402) * x + 32768) >> 16;
  CB_B[i] = (fix(1.772) * x + 32768) >> 16;
  CR_G[i] = -fix(0.71414) * x;
  CB_G[i] = -fix(0.34414) * x + 32768;
}
const clamp = (v) => (v < 0 ? 0 : v > 255 ? 255 : v);

/** Decode a JPEG at 1/scale (2, 4 or 8) exactly as Pillow's draft mode does;
 * returns {width, height, data: RGB, orientation} (orientation not applied), or
 * null for the kinds of JPEG this file does not handle. */
export function decodeJpegScaled(bytes, scale) {
  let f;
  try {
    f = parse(bytes);
  } catch (e) {
    if (e instanceof Unsupported) return null;
    throw e;
  }
  const fr = f.frame, n = fr.comps.length;
  if (n !== 1 && n !== 3) return null; // CMYK / YCCK
  const min = 8 / scale, width = Math.ceil(fr.width / scale), height = Math.ceil(fr.height / scale);
  const planes = fr.comps.map((c) => {
    let size = min; // jdmaster.c: scale chroma up by IDCT rather than by upsampling, where it divides
    while (size < 8 && (fr.hmax * min) % (c.h * size * 2) === 0 && (fr.vmax * min) % (c.v * size * 2) === 0) size *= 2;
    const pl = componentPlane(f, c, size);
    const rh = (fr.hmax * min) / (c.h * size), rv = (fr.vmax * min) / (c.v * size);
    if (!Number.isInteger(rh) || !Number.isInteger(rv)) throw new Error("unsupported sampling factors");
    if (rh === 1 && rv === 1) return (x, y) => pl.data[y * pl.stride + x];
    const up = upsample(pl, rh, rv, min > 1, width, height);
    return (x, y) => up[y * width + x];
  });
  // jdapimin.c default_decompress_parms: JFIF means YCbCr, else Adobe's transform flag, else the component ids.
  const ids = fr.comps.map((c) => c.id).join();
  const rgb = n === 3 && !f.jfif && (f.adobe === 0 || (f.adobe === null && ids === "82,71,66"));
  const data = new Uint8Array(width * height * 3);
  for (let y = 0, o = 0; y < height; y++) {
    for (let x = 0; x < width; x++, o += 3) {
      if (n === 1) { data[o] = data[o + 1] = data[o + 2] = planes[0](x, y); continue; }
      const Y = planes[0](x, y), cb = planes[1](x, y), cr = planes[2](x, y);
      if (rgb) { data[o] = Y; data[o + 1] = cb; data[o + 2] = cr; continue; }
      data[o] = clamp(Y + CR_R[cr]);
      data[o + 1] = clamp(Y + ((CB_G[cb] + CR_G[cr]) >> 16));
      data[o + 2] = clamp(Y + CB_B[cb]);
    }
  }
  return { width, height, data, orientation: f.orientation };
}

/** ImageOps.exif_transpose for EXIF orientations 2-8. */
export function orient(img, orientation) {
  if (!(orientation >= 2 && orientation <= 8)) return img;
  const { width: W, height: H, data } = img, swap = orientation >= 5;
  const w = swap ? H : W, h = swap ? W : H, out = new Uint8Array(data.length);
  const src = [null, null,
    (x, y) => [W - 1 - x, y], (x, y) => [W - 1 - x, H - 1 - y], (x, y) => [x, H - 1 - y],
    (x, y) => [y, x], (x, y) => [y, H - 1 - x], (x, y) => [W - 1 - y, H - 1 - x],
    (x, y) => [W - 1 - y, x]][orientation];
  for (let y = 0, o = 0; y < h; y++) {
    for (let x = 0; x < w; x++, o += 3) {
      const [sx, sy] = src(x, y), s = (sy * W + sx) * 3;
      out[o] = data[s]; out[o + 1] = data[s + 1]; out[o + 2] = data[s + 2];
    }
  }
  return { width: w, height: h, data: out };
}
