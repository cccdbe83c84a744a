"""grounding.load_image: every input comes back upright, 8-bit RGB, or fails with a clear
ImageLoadError; and a box the model writes on the upright picture lands back on the object."""

from __future__ import annotations

import gc
import io
import json
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import grounding
from grounding import GroundingError, ImageLoadError, load_image, model_frame, result_from_text

# The upright picture: gray background, one solid red rectangle placed off-centre so each
# of the eight EXIF orientations (the dihedral group of the rectangle) moves it elsewhere.
W, H = 240, 160
RECT = (30, 20, 130, 100)  # x_min, y_min, x_max, y_max in pixel-edge coordinates
GRAY = (128, 128, 128)
RED = (230, 20, 20)


def upright_array() -> np.ndarray:
    a = np.empty((H, W, 3), np.uint8)
    a[:] = GRAY
    x0, y0, x1, y1 = RECT
    a[y0:y1, x0:x1] = RED
    return a


def stored_for(orientation: int, u: np.ndarray) -> np.ndarray:
    """The pixels a camera stores so that a viewer honouring EXIF ``orientation`` shows ``u``.

    Written from the EXIF definition of the tag (where the stored 0th row / 0th column are
    shown), independently of PIL's transpose table:
    1 row0=top col0=left, 2 top/right, 3 bottom/right, 4 bottom/left,
    5 row0=left col0=top, 6 right/top, 7 right/bottom, 8 left/bottom.
    """
    t = (1, 0, 2)
    return {
        1: u,
        2: u[:, ::-1],
        3: u[::-1, ::-1],
        4: u[::-1, :],
        5: u.transpose(t),                # S[i, j] = U[j, i]
        6: u[:, ::-1].transpose(t),       # S[i, j] = U[j, W-1-i]
        7: u[::-1, ::-1].transpose(t),    # S[i, j] = U[H-1-j, W-1-i]
        8: u[::-1, :].transpose(t),       # S[i, j] = U[H-1-j, i]
    }[orientation]


def save_oriented(path: Path, orientation: int, fmt: str) -> None:
    stored = Image.fromarray(np.ascontiguousarray(stored_for(orientation, upright_array())))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    stored.save(path, fmt, exif=exif.tobytes(), **kwargs)


def region_means(image: Image.Image, box) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour inside ``box`` (shrunk by 2 px against JPEG ringing) and outside it
    (grown by 2 px)."""
    a = np.asarray(image, dtype=np.float64)
    x0, y0, x1, y1 = box
    inside = a[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).mean(axis=0)
    mask = np.ones(a.shape[:2], bool)
    mask[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = False
    outside = a[mask].mean(axis=0)
    return inside, outside


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def red_box_seen_by_model(image: Image.Image, frame: tuple[int, int]) -> tuple[int, ...]:
    """What a perfect model answers: the red region's box, in integer pixels of the image
    it is shown (the loaded image resized to the model frame)."""
    seen = np.asarray(image.resize(frame, Image.Resampling.BILINEAR), dtype=np.int32)
    red = (seen[..., 0] > 170) & (seen[..., 1] < 90) & (seen[..., 2] < 90)
    ys, xs = np.nonzero(red)
    assert xs.size, "the model frame shows no red at all"
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def assert_red_crop(image: Image.Image, bbox) -> None:
    x0, y0, x1, y1 = (int(np.ceil(bbox[0])), int(np.ceil(bbox[1])),
                      int(np.floor(bbox[2])), int(np.floor(bbox[3])))
    crop = np.asarray(image, dtype=np.float64)[y0:y1, x0:x1].reshape(-1, 3)
    assert crop.size
    r, g, b = crop.mean(axis=0)
    assert r > 200 and g < 50 and b < 50, (bbox, (r, g, b))


# ----------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_image(tmp_path, orientation, fmt, suffix):
    path = tmp_path / f"o{orientation}.{suffix}"
    save_oriented(path, orientation, fmt)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        stored_size = raw.size
    assert stored_size == ((H, W) if orientation >= 5 else (W, H))

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (W, H)
    inside, outside = region_means(image, RECT)
    tol = 12 if fmt == "JPEG" else 0.5
    assert np.all(np.abs(inside - RED) <= tol), inside
    assert np.all(np.abs(outside - GRAY) <= tol), outside
    if fmt == "PNG":
        assert np.array_equal(np.asarray(image), upright_array())


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    "dialect,budget",
    [
        ("qwen2.5-vl", {}),  # the processor's defaults
        ("qwen2.5-vl", {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}),
        ("qwen2.5-vl", {"min_pixels": 4 * 28 * 28, "max_pixels": 24 * 28 * 28}),  # shrinks
        ("qwen3-vl", {}),
        ("qwen3-vl", {"min_pixels": 16 * 32 * 32, "max_pixels": 24 * 32 * 32}),
    ],
)
def test_model_box_goes_back_on_the_object(tmp_path, orientation, dialect, budget):
    """Rotated JPEG -> load -> model frame -> model answer -> result: on the red rectangle."""
    path = tmp_path / f"o{orientation}.jpg"
    save_oriented(path, orientation, "JPEG")
    image = load_image(path)
    w, h = image.size
    frame = model_frame(dialect, w, h, **budget)
    fx0, fy0, fx1, fy1 = red_box_seen_by_model(image, frame)
    if dialect == "qwen2.5-vl":
        written = [fx0, fy0, fx1, fy1]  # absolute pixels of the frame
        input_size = frame
    else:
        fw, fh = frame
        written = [round(fx0 / fw * 1000), round(fy0 / fh * 1000),
                   round(fx1 / fw * 1000), round(fy1 / fh * 1000)]  # relative 0..1000
        input_size = None
    text = "```json\n" + json.dumps([{"bbox_2d": written, "label": "red box"}]) + "\n```"

    result = result_from_text(text, dialect, image_size=(w, h), input_size=input_size)

    assert result.image_size == (W, H)
    assert len(result.boxes) == 1
    bbox = result.boxes[0].bbox
    assert iou(bbox, RECT) > 0.9, (frame, written, bbox)
    assert_red_crop(image, bbox)


def test_pil_input_with_exif_orientation_is_transposed(tmp_path):
    path = tmp_path / "o6.jpg"
    save_oriented(path, 6, "JPEG")
    with Image.open(path) as opened:
        assert opened.size == (H, W)
        image = load_image(opened)
    assert image.size == (W, H)
    inside, outside = region_means(image, RECT)
    assert np.all(np.abs(inside - RED) <= 12)
    assert np.all(np.abs(outside - GRAY) <= 12)


def test_bytes_input_with_exif_orientation(tmp_path):
    path = tmp_path / "o8.png"
    save_oriented(path, 8, "PNG")
    image = load_image(path.read_bytes())
    assert np.array_equal(np.asarray(image), upright_array())


# ----------------------------------------------------------------------------- modes


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def roundtrip_png(tmp_path, image: Image.Image, **kwargs) -> Image.Image:
    path = tmp_path / f"{image.mode.replace(';', '_')}.png"
    image.save(path, "PNG", **kwargs)
    return load_image(path)


def test_rgba_transparent_becomes_white_opaque_keeps_colour(tmp_path):
    a = np.zeros((4, 3, 4), np.uint8)
    a[0] = (10, 200, 30, 255)  # opaque green
    a[1] = (10, 200, 30, 0)    # transparent green -> white
    a[2] = (0, 0, 0, 128)      # half-transparent black -> mid gray
    a[3] = (200, 0, 0, 0)      # transparent red -> white
    out = pixels(roundtrip_png(tmp_path, Image.fromarray(a, "RGBA")))
    assert (out[0] == (10, 200, 30)).all()
    assert (out[1] == 255).all()
    assert (np.abs(out[2] - 127) <= 1).all()
    assert (out[3] == 255).all()


def test_la_transparent_becomes_white(tmp_path):
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    out = pixels(roundtrip_png(tmp_path, la))
    assert (out[0, 0] == 40).all()
    assert (out[0, 1] == 255).all()


def palette_image() -> Image.Image:
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2])
    return p


def test_palette_without_transparency(tmp_path):
    out = pixels(roundtrip_png(tmp_path, palette_image()))
    assert out[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 128, 0]]


def test_palette_with_transparency_index_becomes_white(tmp_path):
    out = pixels(roundtrip_png(tmp_path, palette_image(), transparency=1))
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 128, 0]]


def test_grayscale_l(tmp_path):
    out = pixels(roundtrip_png(tmp_path, Image.fromarray(np.array([[0, 77, 255]], np.uint8))))
    assert out[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]


def test_one_bit(tmp_path):
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8)).convert("1")
    assert bits.mode == "1"
    out = pixels(roundtrip_png(tmp_path, bits))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0], [255, 255, 255]]


def test_16_bit_png_is_scaled_not_clamped(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    out = pixels(load_image(path))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_dark_16_bit_png_stays_dark(tmp_path):
    """Scale by the 16-bit range, not the brightest pixel: a 16-bit image whose values are
    all below 256 is nearly black, and must not flip to bright when one pixel passes 255."""
    dark = tmp_path / "dark.png"
    darker_max = tmp_path / "dark2.png"
    Image.fromarray(np.array([[0, 100, 200]], np.uint16)).save(dark)
    Image.fromarray(np.array([[0, 100, 300]], np.uint16)).save(darker_max)
    assert pixels(load_image(dark))[0, :, 0].tolist() == [0, 0, 1]
    assert pixels(load_image(darker_max))[0, :, 0].tolist() == [0, 0, 1]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = pixels(load_image(path))
    assert np.abs(out.reshape(-1, 3).mean(axis=0) - (255, 0, 0)).max() < 8


def test_numpy_uint8_rgb_is_taken_as_rgb():
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = (255, 0, 0)
    a[1, 2] = (0, 0, 255)
    image = load_image(a)
    assert image.size == (3, 2)
    assert np.array_equal(np.asarray(image), a)


def test_numpy_rgba_alpha_composited_on_white():
    a = np.array([[[0, 0, 255, 255], [0, 0, 255, 0]]], np.uint8)
    assert pixels(load_image(a))[0].tolist() == [[0, 0, 255], [255, 255, 255]]


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1)])
def test_numpy_gray(shape):
    a = np.arange(6, dtype=np.uint8).reshape(shape) * 40
    out = pixels(load_image(a))
    assert out.shape == (2, 3, 3)
    assert (out[..., 0] == a.reshape(2, 3)).all() and (out[..., 2] == a.reshape(2, 3)).all()


def test_numpy_uint16_is_scaled():
    a = np.array([[0, 32768, 65535]], np.uint16)
    assert pixels(load_image(a))[0, :, 0].tolist() == [0, 128, 255]


def test_numpy_float_unit_range_is_scaled():
    a = np.zeros((1, 3, 3), np.float32)
    a[0, 1] = 0.5
    a[0, 2] = (1.0, 0.0, 0.25)
    out = pixels(load_image(a))
    assert out[0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 0, 64]]


def test_bytes_input():
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, "PNG")
    image = load_image(buf.getvalue())
    assert image.size == (5, 4)
    assert (pixels(image) == (1, 2, 3)).all()


def test_rgb_pil_input_comes_back_equal():
    src = Image.fromarray(upright_array())
    assert np.array_equal(np.asarray(load_image(src)), upright_array())


# ----------------------------------------------------------------------------- errors


def test_image_load_error_is_a_grounding_error():
    assert issubclass(ImageLoadError, GroundingError)
    assert issubclass(grounding.GeometryError, GroundingError)


def expect_error(source, *reasons: str, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    if isinstance(source, str | Path):
        assert str(source) in message
    low = message.lower()
    assert any(r in low for r in reasons), message
    return info.value


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_text("this is not a picture\n")
    err = expect_error(path, "not an image")
    assert err.source == str(path)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file(tmp_path, fmt, suffix):
    rng = np.random.default_rng(0)
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), np.uint8)).save(full, fmt)
    data = full.getvalue()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated")
    # the same bytes given directly fail the same way, named by their length
    err = expect_error(data[: len(data) // 2], "truncated")
    assert f"<{len(data) // 2} bytes>" in str(err)


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.png", "no such file")
    expect_error(str(tmp_path / "nope.png"), "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "not a file")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 1-bit pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    assert path.stat().st_size < 200
    saved = Image.MAX_IMAGE_PIXELS
    err = expect_error(path, "decompression bomb")
    assert "exceeds" in str(err) and "100000x100000" in str(err)
    assert saved == Image.MAX_IMAGE_PIXELS  # PIL's global limit is left as it was
    expect_error(png_claiming(100_000, 100_000), "decompression bomb")


def test_other_threads_keep_pils_bomb_guard_while_an_image_loads(tmp_path, monkeypatch):
    """load_image must not turn PIL's process-wide decompression-bomb limit off while it
    opens a file: a bomb opened by another thread at that very moment is still refused."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (30, 20), RED).save(photo)
    factory, accept = Image.OPEN["PNG"]
    loader = threading.get_ident()
    outcome: list[str] = []

    def other_thread() -> None:
        try:
            with Image.open(bomb) as im:
                outcome.append(f"opened {im.size} (limit {Image.MAX_IMAGE_PIXELS})")
        except Image.DecompressionBombError:
            outcome.append("refused")

    def png_opener(*args, **kwargs):
        # Runs inside load_image, while PIL reads photo.png's header: open the bomb from
        # another thread now, and wait for it.
        if threading.get_ident() == loader and not outcome:
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join(timeout=30)
        return factory(*args, **kwargs)

    monkeypatch.setitem(Image.OPEN, "PNG", (png_opener, accept))
    assert load_image(photo).size == (30, 20)
    assert outcome == ["refused"]


def test_grounding_limit_not_pils_decides(monkeypatch):
    """The size check is grounding's max_image_pixels, whatever PIL's global limit says,
    and opening an allowed image above PIL's limit warns nothing."""
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), RED).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is a "bomb" to PIL
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(buf.getvalue()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(buf.getvalue()).size == (100, 100)
    expect_error(buf.getvalue(), "exceeds", max_image_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_max_image_pixels_limit(tmp_path):
    path = tmp_path / "normal.png"
    Image.new("RGB", (300, 200)).save(path)
    expect_error(path, "exceeds", max_image_pixels=300 * 200 - 1)
    assert load_image(path, max_image_pixels=300 * 200).size == (300, 200)
    with pytest.raises(ImageLoadError, match="exceeds"):
        load_image(Image.new("RGB", (300, 200)), max_image_pixels=1000)


def test_bad_array_and_bad_type():
    with pytest.raises(ImageLoadError, match=r"HxW"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageLoadError, match=r"HxW"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageLoadError, match="expected a path"):
        load_image(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "fmt", "frames"), [
    ("one.gif", "GIF", 1), ("anim.gif", "GIF", 3), ("pages.tiff", "TIFF", 3),
    ("anim.png", "PNG", 3), ("photo.mpo", "MPO", 2), ("anim.webp", "WEBP", 3),
    ("one.png", "PNG", 1), ("one.jpg", "JPEG", 1),
])
def test_load_image_closes_the_file_of_any_format(tmp_path, name, fmt, frames):
    """PIL keeps multi-frame files (GIF, MPO, TIFF, APNG) open for their other frames;
    load_image returns the first frame's pixels with the file closed, so a run over many
    images never holds (or leaks, at garbage collection) a handle per image."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][:frames]
    pictures = [Image.new("RGB", (20, 10), c) for c in colours]
    path = tmp_path / name
    pictures[0].save(path, fmt, save_all=frames > 1, append_images=pictures[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        image = load_image(path)
        assert image.size == (20, 10) and image.mode == "RGB"
        assert np.abs(np.asarray(image, int)[5, 10] - colours[0]).max() <= 12
        assert getattr(image, "fp", None) is None
        del image
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
