"""Reading one image safely: by content, EXIF-upright, always RGB, never a bomb.

Everything that opens an image (training, checking, predicting, serving) goes
through `open_image`, so every entry point treats odd files the same way.
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we accept, told by content (PIL sniffs the header), never by extension.
# MPO is what many phone cameras write for JPEGs.
FORMATS = {"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"}
# Default ceiling on decoded pixels: 100 MP is above any camera photo a
# classifier needs and far below what would exhaust memory.
MAX_PIXELS = 100_000_000

# Pillow's settings are the application's: importing imgclf changes none of
# them. imgclf's own pixel limit (per call, checked from the header) sits under
# Pillow's bomb check (an error from about 179 MP), whose error is reported
# like ours; truncated files fail as long as ImageFile.LOAD_TRUNCATED_IMAGES
# keeps its default (False).

Source = str | os.PathLike | bytes | BinaryIO | Image.Image | np.ndarray
# Largest file read as one image: a 100 MP TIFF is under 400 MB; anything
# bigger is not a photo a classifier needs, and would only be held in memory.
MAX_FILE_BYTES = 1 << 30
ORIENTATION = 0x0112  # the EXIF tag
# Most memory one image may take to decode (decode_cost): a 100 MP RGB photo
# needs about 500 MB; a 1 x 90,000,000 RGB strip under the pixel limit 1.4 GB.
MAX_DECODE_BYTES = 1 << 30


class BadImage(Exception):
    """A file that cannot be used as an image. `reason` says why, for a person."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _name(src: Source) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _os_reason(e: OSError) -> str:
    import errno

    why = {errno.ENOENT: "file not found (deleted or moved since it was listed, or a link to nothing)",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.ELOOP: "a loop of symbolic links"}.get(e.errno, e.strerror or str(e))
    return f"cannot read file: {why}"


def _check_regular(name: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(name, f"{_file_kind(st.st_mode)}, not an image file: only regular files are read; "
                             f"remove it (or the link to it) from the data")
    if st.st_size == 0:
        raise BadImage(name, "empty file (0 bytes); delete it or replace it with the real image")
    if st.st_size > MAX_FILE_BYTES:
        raise BadImage(name, f"{st.st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit for one image file")


@contextmanager
def open_regular(path: str | os.PathLike):
    """A binary file object of a regular file (links followed), or BadImage.
    Devices (/dev/zero, /dev/urandom), FIFOs and sockets are refused before
    they are opened, and again on the opened descriptor (the path may have
    been swapped in between): reading one never ends, or blocks forever."""
    name = str(path)
    try:
        _check_regular(name, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImage(name, _os_reason(e)) from None
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(name, os.fstat(fd))
        yield f
    finally:
        f.close()


def read_file(path: str | os.PathLike) -> bytes:
    """All bytes of a regular file, from one read (open_regular's checks), or BadImage.
    What is hashed and what is decoded must be these same bytes."""
    with open_regular(path) as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise BadImage(str(path), _os_reason(e)) from None
    if not data:
        raise BadImage(str(path), "empty file (0 bytes); delete it or replace it with the real image")
    if len(data) > MAX_FILE_BYTES:
        raise BadImage(str(path), f"over the {MAX_FILE_BYTES:,}-byte limit for one image file")
    return data


def open_image(src: Source, draft_size: int | None = None, max_pixels: int = MAX_PIXELS,
               max_bytes: int | None = None) -> Image.Image:
    """Return `src` as an upright RGB PIL image, or raise BadImage.

    draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as
    both sides stay >= draft_size. Decoding a 500x375 photo for a 224 px model
    is then about 2x cheaper (bench/bench_pipeline.py) with no visible loss,
    because the resize that follows would throw those pixels away anyway.
    A path is read once, whole (read_file), then decoded from memory.
    """
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        return to_rgb(_from_array(src))
    name = _name(src)
    if isinstance(src, (str, os.PathLike)):
        src = read_file(src)
    return decode(src, name, draft_size, max_pixels, max_bytes)


def decode(src: bytes | BinaryIO, name: str, draft_size: int | None = None, max_pixels: int = MAX_PIXELS,
           max_bytes: int | None = None) -> Image.Image:
    """Bytes (or a binary file object) -> upright RGB PIL image, or BadImage naming `name`.
    max_bytes: refuse, from the header, what would take more memory to decode (decode_cost)."""
    max_bytes = MAX_DECODE_BYTES if max_bytes is None else max_bytes
    if isinstance(src, bytes):
        if not src:
            raise BadImage(name, "empty data (0 bytes)")
        src = io.BytesIO(src)
    img = open_header(src, name)
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(name, f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (decompression bomb?)")
    cost = decode_cost(img.format, img.mode, img.size, draft_size)
    if cost > max_bytes:
        raise BadImage(name, f"decoding this {w}x{h} {img.mode} {img.format} would take about {cost >> 20:,} MB, over "
                             f"the {max_bytes >> 20:,} MB limit for one image (an extreme strip or mode?)")
    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        raise BadImage(name, f"corrupt or truncated image data ({e})") from None
    img = upright(img)
    try:
        return to_rgb(shrink(img, draft_size) if draft_size else img)
    except Exception as e:  # an odd mode PIL opens but cannot convert (e.g. TIFF "La")
        raise BadImage(name, f"cannot convert colour mode {img.mode} to RGB ({e})") from None


# Bytes per pixel PIL stores for each mode: "1" takes a byte a pixel, and
# every multi-band 8-bit mode (RGB and LA included) four.
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 4, "PA": 4, "La": 4, "RGB": 4, "YCbCr": 4, "LAB": 4, "HSV": 4,
              "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2}


def decode_cost(fmt: str, mode: str, size: tuple[int, int], draft_size: int | None = None) -> int:
    """Peak bytes that open_image (then the resize) may hold for an image of
    this header, stage by stage, so a memory budget can count real bytes
    rather than pixels: the decoded image in its own mode; a PNG decoder's
    row buffers (three rows: one row can be the whole image, as in a
    1 x 39,000,000 strip); then either a small reduced copy (shrink: mode "1"
    first becomes an "L" copy) or, at full size, the conversion to RGB
    through an RGBA-sized intermediate. tests/test_images.py measures it."""
    w, h = size
    px, bpp = w * h, MODE_BYTES.get(mode, 4)
    cost = px * bpp
    if fmt == "PNG":
        cost += 3 * w * bpp
    reduced = draft_size and min(w, h) // (2 * draft_size) >= 2 and mode not in ("P", "PA")
    if reduced:
        cost += px if mode == "1" else px * bpp // 4
    elif mode != "RGB":
        cost += px * 4 * (2 if mode in ("RGBA", "LA", "PA", "P") else 1)
    return cost + (8 << 20)  # the resize's own buffers and PIL's bookkeeping


def upright(img: Image.Image) -> Image.Image:
    """The image as displayed (EXIF orientation applied). Without an
    orientation to apply the image itself is returned: exif_transpose would
    copy every image, a second full-size buffer for nothing."""
    try:
        if img.getexif().get(ORIENTATION, 1) in (0, 1):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:
        return img  # a broken EXIF block should not cost us the pixels


def shrink(img: Image.Image, draft_size: int) -> Image.Image:
    """Box-reduce an image far larger than the model needs by an integer factor,
    in its own (often 1- or 8-bit) mode, before it becomes RGB: a 5 KB PNG of
    40 MP then costs 40 MB, not 120 MB of RGB and a full-size resize. It keeps
    at least twice draft_size on the short side, so the final resize still has
    its usual margin; photos under 4x the input size are left untouched."""
    factor = min(img.size) // (2 * draft_size)
    if factor < 2:
        return img
    if img.mode == "1":
        img = img.convert("L")
    try:
        return img.reduce(factor)
    except (ValueError, NotImplementedError):  # modes reduce() does not support (e.g. P): full size, as before
        return img


def sniff(path: str | os.PathLike) -> tuple[str, str, tuple[int, int]]:
    """Cheap check (header only, no decode): (format, mode, size), or BadImage."""
    name = str(path)
    with open_regular(path) as f, open_header(f, name) as img:
        return img.format, img.mode, img.size


def open_header(src: BinaryIO, name: str) -> Image.Image:
    """Pillow's lazy open (the header only) of an accepted format, or BadImage naming `name`."""
    try:
        img = Image.open(src)
    except UnidentifiedImageError:
        raise BadImage(name, "not an image: content is not JPEG, PNG, BMP, GIF, WebP or TIFF") from None
    except Image.DecompressionBombError:
        raise BadImage(name, "over Pillow's decompression-bomb limit (about 179 MP): too many pixels") from None
    except OSError as e:
        raise BadImage(name, f"cannot read file: {e}") from None
    except (ValueError, EOFError) as e:  # a format plugin's own complaint (a PPM header cut short)
        raise BadImage(name, f"not an image: its header cannot be read ({str(e)[:100]})") from None
    if img.format not in FORMATS:
        img.close()
        raise BadImage(name, f"unsupported image format {img.format}; convert it to JPEG or PNG")
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise BadImage("<array>", f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {a.shape}")
    if a.dtype != np.uint8:
        # Floats are taken as [0, 1] (what most libraries produce), ints as 0..255.
        a = np.clip(a * 255.0 if np.issubdtype(a.dtype, np.floating) else a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        return Image.fromarray(a[:, :, 0], "L")
    return Image.fromarray(a, "RGBA" if a.shape[2] == 4 else "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited on white (what a
    viewer shows), 16-bit and float images are scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if (mode.startswith("I;16") or a.max() > 255) else 255.0
        if mode == "F" and a.max() <= 1.0:
            hi = 1.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def list_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under `folder`, sorted, so that a split is
    the same on every machine. Non-images are kept: they get reported later."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def thumbnail(src: Source, size: int, quality: int = 80) -> bytes | None:
    """A small JPEG of an image, upright (EXIF applied), its longer side at
    most `size` pixels; None if it cannot be read. The one thumbnail of
    imgclf: the report's galleries and data map, and the similarity index
    (whose thumbnails a server shows without ever opening a path)."""
    try:
        img = open_image(src, draft_size=2 * size)
    except (BadImage, OSError):
        return None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
