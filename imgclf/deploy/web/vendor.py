"""Fetch ONNX Runtime Web's browser files from its npm package, once, at build time.

    python -m imgclf.deploy.web.vendor        (`make setup` runs it)

The pinned tarball is downloaded from the npm registry with urllib (no node or
npm needed), checked against the sha512 the registry publishes for it
(`dist.integrity`, pinned below), and only the files a page needs are kept in
imgclf/deploy/web/vendor/ (git-ignored, shipped as package data). `imgclf
export --format web` then needs no network.

Which files: the wasm-only build (no WebGL/WebGPU/WebNN code), as an ES module
(ort.wasm.min.mjs, 50 KB), plus the Emscripten loader and the WebAssembly binary
it imports. Since 1.19 the package ships a single binary, SIMD + threads; with
`numThreads = 1` it runs without SharedArrayBuffer, i.e. on any static host: a
page only gets threads under cross-origin isolation (COOP/COEP headers), which
GitHub Pages, an S3 bucket or `python -m http.server` do not send.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "1.30.0"
TARBALL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{VERSION}.tgz"
# npm's dist.integrity for that tarball (`npm view onnxruntime-web@1.30.0 dist.integrity`).
INTEGRITY = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
# MIT licensed; the notice is in each file.
FILES = ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm")
VENDOR = Path(__file__).resolve().parent / "vendor"
STAMP = VENDOR / f"onnxruntime-web-{VERSION}"


def vendored() -> Path | None:
    """The folder holding the pinned ORT Web files, or None if they were never fetched."""
    return VENDOR if STAMP.exists() and all((VENDOR / Path(f).name).exists() for f in FILES) else None


def check_integrity(data: bytes, integrity: str = INTEGRITY) -> None:
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise RuntimeError(f"{TARBALL}: {algo} is {got}, the registry says {want}; refusing to use it")


def fetch(timeout: float = 120) -> Path:
    """Download, verify and unpack the pinned files into VENDOR; no-op if present."""
    if vendored():
        return VENDOR
    with urllib.request.urlopen(TARBALL, timeout=timeout) as r:
        data = r.read()
    check_integrity(data)
    VENDOR.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for rel in FILES:
            member = tar.getmember("package/" + rel)
            (VENDOR / Path(rel).name).write_bytes(tar.extractfile(member).read())
    STAMP.write_text(f"{TARBALL}\n{INTEGRITY}\n")
    return VENDOR


def main() -> int:
    try:
        path = fetch()
    except Exception as e:  # network, registry or integrity: say which, and what to do
        print(f"error: could not fetch ONNX Runtime Web {VERSION} ({e}); `imgclf export --format web` needs it. "
              f"Check access to registry.npmjs.org and run `python -m imgclf.deploy.web.vendor` again",
              file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"ONNX Runtime Web {VERSION}: {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
