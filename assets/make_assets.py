"""Rebuild the sample images in assets/ (see assets/README.md for sources and licences).

The photographs come from scikit-image's wheel (``skimage/data/``), fetched without
installing it::

    pip download --no-deps scikit-image==0.26.0 -d /tmp/wheels
    unzip -q /tmp/wheels/scikit_image-0.26.0-*.whl 'skimage/data/*' -d /tmp/skimage
    python assets/make_assets.py --skimage-data /tmp/skimage/skimage/data

The receipt is drawn here (DejaVu Sans Mono from matplotlib, a dependency of
supervision). ``--overlay`` only redraws ``overlay_example.jpg`` (the README's
illustration) from ``images/cameraman.jpg`` and a hand-written answer.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
QUALITY = 85
MAX_SIDE = 800
ORIENTATION = 0x0112

# (file in skimage/data, name here)
PHOTOS = [
    ("astronaut.png", "astronaut.jpg"),
    ("camera.png", "cameraman.jpg"),
    ("coffee.png", "coffee.jpg"),
    ("rocket.jpg", "rocket.jpg"),
]
EXIF_ROTATED = ("chelsea.png", "cat_exif_rotated.jpg")

# Written by hand, for the README's overlay illustration, the way Qwen2.5-VL writes boxes:
# absolute pixels of its model frame (504x504 for this 512x512 photo). Not a model run.
HAND_WRITTEN_ANSWER = """```json
[
  {"bbox_2d": [0, 65, 329, 504], "label": "person"},
  {"bbox_2d": [252, 134, 323, 189], "label": "camera"},
  {"bbox_2d": [222, 181, 404, 504], "label": "tripod"}
]
```"""

RECEIPT_LINES = [
    ("CORNER CAFE", "title"),
    ("12 Harbour Street", "center"),
    ("Tel 555-0142", "center"),
    ("", "left"),
    ("Date 2024-03-14      Time 09:41", "left"),
    ("Table 7         Receipt #00418", "left"),
    ("-" * 32, "left"),
    ("2 x Espresso              5.00", "left"),
    ("1 x Cappuccino            3.80", "left"),
    ("1 x Croissant             2.90", "left"),
    ("1 x Orange juice          4.20", "left"),
    ("1 x Granola bowl          6.50", "left"),
    ("-" * 32, "left"),
    ("SUBTOTAL                 22.40", "left"),
    ("VAT 10%                   2.24", "left"),
    ("TOTAL                    24.64", "bold"),
    ("", "left"),
    ("CASH                     30.00", "left"),
    ("CHANGE                    5.36", "left"),
    ("-" * 32, "left"),
    ("Thank you, see you soon!", "center"),
]


def save_jpeg(image: Image.Image, path: Path, **kwargs) -> None:
    """JPEG (RGB, or grayscale as it was) at quality 85, no metadata but ``kwargs``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image if image.mode in ("RGB", "L") else image.convert("RGB")
    image.save(path, "JPEG", quality=QUALITY, optimize=True, **kwargs)


def downscale(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_SIDE:
        return image
    image = image.copy()
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def photos(skimage_data: Path) -> None:
    for source, name in PHOTOS:
        with Image.open(skimage_data / source) as im:
            im.load()
            save_jpeg(downscale(im), IMAGES / name)
    source, name = EXIF_ROTATED
    with Image.open(skimage_data / source) as im:
        upright = downscale(im.convert("RGB"))
    # EXIF orientation 6 means "rotate 90 degrees clockwise to display", so the stored
    # pixels are the upright picture turned 90 degrees counter-clockwise.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    save_jpeg(stored, IMAGES / name, exif=exif.tobytes())
    with Image.open(IMAGES / name) as check:
        assert check.size == (upright.height, upright.width)
        assert ImageOps.exif_transpose(check).size == upright.size


def font(bold: bool = False, size: int = 22) -> ImageFont.FreeTypeFont:
    import matplotlib

    name = "DejaVuSansMono-Bold.ttf" if bold else "DejaVuSansMono.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name),
                              size)


def receipt() -> None:
    """A till receipt on a table, slightly turned, as if photographed from above."""
    rng = random.Random(7)
    regular, bold, title = font(), font(bold=True), font(bold=True, size=34)
    width, line_height, margin = 480, 30, 26
    height = margin * 2 + 20 + line_height * len(RECEIPT_LINES)
    paper = Image.new("RGB", (width, height), (247, 245, 238))
    draw = ImageDraw.Draw(paper)
    y = margin
    for text, style in RECEIPT_LINES:
        face = title if style == "title" else bold if style == "bold" else regular
        text_width = draw.textlength(text, font=face)
        x = (width - text_width) / 2 if style in ("title", "center") else margin
        ink = rng.randint(25, 55)
        draw.text((x, y), text, font=face, fill=(ink, ink, ink + 5))
        y += line_height + (20 if style == "title" else 0)
    paper = paper.filter(ImageFilter.GaussianBlur(0.6))

    background = Image.new("RGB", (620, 900), (92, 70, 52))
    shade = Image.linear_gradient("L").resize(background.size).point(lambda v: v // 4)
    background = Image.composite(Image.new("RGB", background.size, (60, 45, 34)),
                                 background, shade)
    mask = Image.new("L", paper.size, 255)
    turned = paper.rotate(-3, resample=Image.Resampling.BICUBIC, expand=True,
                          fillcolor=(0, 0, 0))
    turned_mask = mask.rotate(-3, resample=Image.Resampling.BICUBIC, expand=True)
    shadow = turned_mask.filter(ImageFilter.GaussianBlur(8)).point(lambda v: v * 0.55)
    x = (background.width - turned.width) // 2
    y = (background.height - turned.height) // 2
    background.paste((20, 15, 10), (x + 9, y + 11), shadow)
    background.paste(turned, (x, y), turned_mask)
    save_jpeg(background, IMAGES / "receipt.jpg")


def overlay() -> None:
    from grounding import load_image, model_frame, result_from_text

    image = load_image(IMAGES / "cameraman.jpg")
    result = result_from_text(HAND_WRITTEN_ANSWER, "qwen2.5-vl", image_size=image.size,
                              input_size=model_frame("qwen2.5-vl", *image.size))
    assert len(result) == 3, result
    save_jpeg(result.annotate(image), HERE / "overlay_example.jpg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skimage-data", type=Path,
                        help="scikit-image's skimage/data folder, unzipped from its wheel")
    parser.add_argument("--overlay", action="store_true",
                        help="only redraw overlay_example.jpg")
    args = parser.parse_args()
    if not args.overlay:
        if args.skimage_data is None:
            parser.error("--skimage-data is required (or give --overlay)")
        photos(args.skimage_data)
        receipt()
    overlay()


if __name__ == "__main__":
    main()
