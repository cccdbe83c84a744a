"""Read any image the way a person sees it: EXIF orientation applied, RGB, 8 bits.

Every later step (model frame, boxes, overlays, exports) works in this displayed frame,
so a box lands on the object whatever rotation flag, mode or bit depth the file carries.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from grounding.core.errors import ImageLoadError, StorageError
from grounding.io import storage


@dataclass(frozen=True)
class Named:
    """An input with the name errors and records give it: a distributed worker hands
    over pixels decoded elsewhere, named by their path, so its errors and results read
    as those of a plain run over the paths."""

    name: str
    source: ImageSource


ImageSource = str | PathLike | bytes | Image.Image | np.ndarray | Named

DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
"""Above this many pixels (PIL's own bomb limit, about 13,400 x 13,400) a file is refused
as a likely decompression bomb; pass ``max_image_pixels`` to allow more."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff",
                              ".mpo"})
"""What counts as an image file, by lower-cased suffix: the one list used to find the images
to label (``runs.rundir.find_images``) and the images of a YOLO dataset (``formats.yolo``).
The union of what both used to accept, kept to what PIL decodes: ``.dng`` (in Ultralytics'
list) is left out, as PIL has no raw decoder and opens at most a DNG's TIFF preview, whose
frame is not the photo's."""

def open_header(source: Path | bytes) -> Image.Image:
    """Open a file or bytes reading only the header, without PIL's own pixel-count check at
    open: callers apply grounding's (``max_image_pixels``) before decoding any pixel.

    This is ``Image.open`` without the one call that checks ``Image.MAX_IMAGE_PIXELS``:
    each format's opener reads the header and nothing in the process-wide setting (or the
    warning filters) is touched, so another thread's ``Image.open`` keeps PIL's
    decompression-bomb guard. A few formats (MPO, TIFF, GIF frames) check the size again
    inside PIL; they keep PIL's limit (an error above twice ``Image.MAX_IMAGE_PIXELS``).
    """
    if isinstance(source, bytes):
        stream = io.BytesIO(source)
        prefix = source[:16]
    else:
        with open(source, "rb") as f:
            prefix = f.read(16)
    tried: set[str] = set()
    for register in (Image.preinit, Image.init):
        register()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:  # some formats' checks unpack more bytes than a tiny file has
                accepted = not accept or accept(prefix)
            except (struct.error, IndexError, ValueError):
                continue
            if not accepted or isinstance(accepted, str):
                continue
            try:
                if isinstance(source, bytes):
                    stream.seek(0)
                    return factory(stream, "")
                # Given the path, the opener owns the file: it closes it itself when the
                # header is not its format, and the image closes it when closed.
                return factory(source, None)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {describe(source)!r}")


def displayed_size(path: str | PathLike) -> tuple[int, int]:
    """(width, height) of an image file as a person sees it (EXIF turn applied), read from
    its header alone; OSError, SyntaxError or ValueError when it cannot be read."""
    with open_header(Path(path)) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF: turned 90 degrees
            w, h = h, w
    return w, h


def describe(source: ImageSource) -> str:
    """How an input is named in errors and records."""
    if isinstance(source, Named):
        return source.name
    if isinstance(source, str | PathLike):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {source.shape}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, *,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An upright RGB image; raises :class:`ImageLoadError` naming the input and the cause.

    A ``str`` that is a URI (``s3://``, ``gs://``, ...: :func:`storage.is_uri`) is read
    through :mod:`grounding.io.storage`. numpy arrays are taken as RGB (or RGBA /
    grayscale) in PIL's axis order; convert OpenCV's BGR with ``array[..., ::-1]`` first.
    """
    if isinstance(source, Named):
        try:
            return load_image(source.source, max_image_pixels=max_image_pixels)
        except ImageLoadError as exc:
            raise ImageLoadError(source.name, exc.reason) from None
    name = describe(source)
    if isinstance(source, str) and storage.is_uri(source):
        try:
            source = storage.read_bytes(source)
        except StorageError as exc:
            raise ImageLoadError(name, exc.reason) from None
        return _decode(source, name, max_image_pixels)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source, name))
    if isinstance(source, Image.Image):
        _check_size(source.size, max_image_pixels, name)
        return to_rgb(upright(source))
    if isinstance(source, str | PathLike):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(name, "no such file" if not path.exists() else "not a file")
        data: Path | bytes = path
    elif isinstance(source, bytes):
        data = source
    else:
        raise ImageLoadError(name, "expected a path, bytes, a PIL image or a numpy array")
    return _decode(data, name, max_image_pixels)


def _decode(data: Path | bytes, name: str, max_image_pixels: int) -> Image.Image:
    try:
        image = open_header(data)
        # The file is closed however this ends (a bad file among millions must not hold
        # its handle, nor a GIF, MPO or TIFF, which PIL keeps open for their other
        # frames); the pixels of the first frame stay.
        with image:
            _check_size(image.size, max_image_pixels, name)
            image.load()
            shown = to_rgb(upright(image))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason or isinstance(exc, EOFError):
            reason = f"file is truncated or corrupt ({reason})"
        raise ImageLoadError(name, reason) from None
    return shown


def upright(image: Image.Image) -> Image.Image:
    """The image as displayed: EXIF orientation applied. An image that needs no turn is
    returned as it is, not copied (a copy per image is measurable at hundreds per second)."""
    if image.getexif().get(0x0112, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _check_size(size: tuple[int, int], limit: int, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageLoadError(name, f"image has no pixels ({w}x{h})")
    if w * h > limit:
        raise ImageLoadError(
            name,
            f"{w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
            "(possible decompression bomb; raise max_image_pixels to allow it)",
        )


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageLoadError(name, "expected an HxW, HxWx3 or HxWx4 array")
    if a.dtype != np.uint8:
        a = _to_uint8(a.astype(np.float64))
    return Image.fromarray(np.ascontiguousarray(a))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale integer or float pixels of any range into 0..255."""
    top = float(np.nanmax(a)) if a.size else 0.0
    if top <= 1.0:
        scale = 255.0
    elif top <= 255.0:
        scale = 1.0
    elif top <= 65535.0:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    return np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        # 16-bit files have a known 0..65535 range: scale by it, not by the brightest
        # pixel, or a dark 16-bit image (all values <= 255) would come out 257x brighter.
        gray = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0) + 0.5
        return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        gray = _to_uint8(np.asarray(image, dtype=np.float64))
        return Image.fromarray(gray).convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
