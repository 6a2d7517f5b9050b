"""open_image: by content, EXIF-upright, every mode to RGB, bad data refused with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from imgclf.data.images import BadImage, open_image, sniff


@pytest.fixture()
def photo(tiny):
    return Image.open(sorted((tiny / "train" / "cats").iterdir())[0]).convert("RGB")


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path, photo):
    arr16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    cases = {
        "cmyk.jpg": photo.convert("CMYK"),
        "gray.png": photo.convert("L"),
        "pal.gif": photo.convert("P"),
        "rgba.png": photo.convert("RGBA"),
        "p16.png": Image.fromarray(arr16),
        "bmp.bmp": photo,
        "webp.webp": photo,
        "tiff.tiff": photo,
    }
    for name, img in cases.items():
        out = open_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == photo.size, name
    # 16-bit is scaled down, not clipped to white: it matches the 8-bit grey image.
    a16 = np.asarray(open_image(tmp_path / "p16.png"), dtype=int)
    a8 = np.asarray(open_image(tmp_path / "gray.png"), dtype=int)
    assert np.abs(a16 - a8).max() <= 1


def test_transparency_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = open_image(_save(img, tmp_path / "t.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def test_extension_is_ignored(tmp_path, photo):
    png_named_jpg = _save(photo, tmp_path / "really_png.jpg", format="PNG")
    assert open_image(png_named_jpg).size == photo.size
    assert sniff(png_named_jpg)[0] == "PNG"


@pytest.mark.parametrize("make, reason", [
    (lambda p, src: p.write_bytes(b""), "empty"),
    (lambda p, src: p.write_text("hello, I am text"), "not an image"),
    (lambda p, src: p.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2]), "truncated"),
    # A PPM header cut short: Pillow's PPM plugin raises ValueError, not OSError (a 500 in the server once).
    (lambda p, src: p.write_bytes(b"P6\n"), "not an image"),
])
def test_bad_files_raise_with_reason(tmp_path, tiny, make, reason):
    src = sorted((tiny / "train" / "dogs").iterdir())[0]
    p = tmp_path / "bad.jpg"
    make(p, src)
    with pytest.raises(BadImage) as e:
        open_image(p)
    assert reason in e.value.reason and str(p) in str(e.value)


def test_decompression_bomb_refused(tmp_path):
    Image.new("L", (5000, 5000)).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match="over the limit"):
        open_image(tmp_path / "big.png", max_pixels=10_000_000)


def test_arrays_bytes_and_draft(tiny):
    f = sorted((tiny / "val" / "dogs").iterdir())[0]
    data = f.read_bytes()
    a = open_image(data)
    assert open_image(np.asarray(a)).size == a.size
    assert open_image(np.asarray(a, dtype=np.float32) / 255).mode == "RGB"
    # draft decoding never goes below the requested size
    small = open_image(io.BytesIO(data), draft_size=64)
    assert min(small.size) >= 64


# Peak RSS of this process (VmHWM: getrusage's maxrss keeps the parent's
# peak across fork and exec, so a child of pytest would measure pytest).
_PEAK = """
import sys
from PIL import Image
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
mode, w, h, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from imgclf.data.preprocess import Preprocess
from imgclf.data.images import decode_cost, sniff
pp = Preprocess(size=224)
fmt, mode, size = sniff(path)
before = hwm()
pp.load(path)
print(hwm() - before, decode_cost(fmt, mode, size, pp.draft_size))
"""


@pytest.mark.parametrize("mode, w, h", [("L", 39_000_000, 1), ("RGB", 39_000_000, 1), ("1", 6325, 6325)])
def test_decode_cost_bounds_the_real_peak(tmp_path, mode, w, h):
    """decode_cost (what a memory budget should count) is at least what
    decoding and resizing really take, measured as peak RSS in a fresh
    process: a 1 x 39,000,000 strip's PNG rows, a 1-bit image's byte per pixel."""
    import subprocess
    import sys

    path = tmp_path / "img.png"
    Image.new(mode, (w, h)).save(path)
    out = subprocess.run([sys.executable, "-c", _PEAK, mode, str(w), str(h), str(path)], capture_output=True,
                         text=True, timeout=120)
    peak, cost = map(int, out.stdout.split())
    assert peak <= cost <= 2 * peak + (16 << 20), (peak, cost)


def test_no_orientation_means_no_copy(tmp_path):
    from imgclf.data.images import upright

    img = Image.new("RGB", (64, 32))
    img.save(tmp_path / "plain.jpg")
    with Image.open(tmp_path / "plain.jpg") as im:
        assert upright(im) is im  # exif_transpose would copy every image
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    with Image.open(tmp_path / "rot.jpg") as im:
        assert upright(im).size == (32, 64)


_REFUSE = """
import sys
from imgclf.data.images import BadImage, open_image
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before = hwm()
try:
    open_image(sys.argv[1], draft_size=224, max_bytes=256 << 20)
    print("decoded", hwm() - before)
except BadImage as e:
    print(hwm() - before, e.reason)
"""


def test_an_image_too_costly_to_decode_is_refused_from_its_header(tmp_path):
    """A 1 x 39,000,000 RGB PNG is under the pixel limit but would take
    ~370 MB to decode: over a 256 MB limit it is refused before any decoding."""
    import subprocess
    import sys

    Image.new("RGB", (39_000_000, 1)).save(tmp_path / "strip.png")
    out = subprocess.run([sys.executable, "-c", _REFUSE, str(tmp_path / "strip.png")], capture_output=True, text=True,
                         timeout=120).stdout
    grew, reason = out.split(" ", 1)
    assert "over the 256 MB limit for one image" in reason and int(grew) < (32 << 20), out


def test_importing_imgclf_leaves_pillow_settings_alone(tmp_path):
    """Pillow's global settings are the application's; a too-big image is still refused, with imgclf's reason."""
    import subprocess
    import sys

    code = ("from PIL import Image, ImageFile; before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES); "
            "import imgclf, imgclf.data.images as I, imgclf.data.datasets, imgclf.deploy.serve; "
            "assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before, before; "
            "import io; buf = io.BytesIO(); Image.new('1', (20000, 10000)).save(buf, 'PNG'); "
            "err = None\ntry:\n    I.decode(buf.getvalue(), 'big.png')\nexcept I.BadImage as e:\n    err = e.reason\n"
            "assert err and 'decompression-bomb' in err, err; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
