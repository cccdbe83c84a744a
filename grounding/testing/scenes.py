"""Synthetic scenes with a known answer: solid-colour rectangles on a textured grey ground.

A scene is an image and its ground truth. Each class is one pure colour (by default
``"red box"`` red, ``"green box"`` green, ``"blue box"`` blue), drawn as axis-aligned
rectangles that never touch (a ``gap`` apart, and that far from the border) on a grey
background with low-frequency shading, grain and grey clutter, none of which is near a
class colour. So a detector that looks for the colours (:func:`colour_boxes`, what the
loopback server's :func:`~grounding.testing.loopback.scene_handler` does) finds exactly the
truth, down to the pixel, at any scale at which an object still covers a few pixels::

    from grounding.testing.scenes import scene, scenes, write_dataset

    s = scene(4032, 3024, objects=12, seed=3, sizes=[(24, 48), (200, 500)])
    s.image                 # PIL RGB image, 4032x3024
    s.objects[0]            # SceneObject(label='red box', box=(x_min, y_min, x_max, y_max))

    data = write_dataset("data", scenes(20, 4032, 3024, 12, sizes=[(24, 48), (200, 500)]))
    # data/images/scene_000.jpg ..., data/truth.json (COCO, for grounding eval --gt)

Boxes are pixel edges (xyxy: a rectangle filling columns 10..19 is ``x_min=10,
x_max=20``), the convention of grounding's records, so truth and detections compare as
they are. Everything is deterministic in ``seed``.

:func:`save_scene` can store a file EXIF-rotated (``orientation`` 1-8): the pixels are
stored turned and the orientation tag says how to show them, so a reader that honours EXIF
(grounding does) sees the scene as generated, and the truth stays in that displayed frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_CLASSES",
    "Scene",
    "SceneDataset",
    "SceneObject",
    "coco_truth",
    "colour_boxes",
    "save_scene",
    "scene",
    "scenes",
    "write_dataset",
]

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]

DEFAULT_CLASSES: dict[str, Colour] = {
    "red box": (255, 0, 0),
    "green box": (0, 255, 0),
    "blue box": (0, 0, 255),
}
"""Class name -> its pure colour. A class colour has every channel at 0 or 255 and is not
black or white (those are too near the grey ground)."""

_ORIENT_STORE = {
    # orientation -> the transpose that turns the upright image into the stored pixels
    # (the inverse of what ImageOps.exif_transpose applies when reading)
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class SceneObject:
    label: str
    box: Box
    """Pixel edges (x_min, y_min, x_max, y_max) in the displayed image."""

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass
class Scene:
    image: Image.Image
    """RGB, upright (the displayed frame)."""
    objects: list[SceneObject]
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    """Every class the scene could hold, in class-id order (the COCO categories)."""

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def boxes(self, label: str | None = None) -> list[Box]:
        """The truth boxes (of one class, or all)."""
        return [o.box for o in self.objects if label is None or o.label == label]


# ------------------------------------------------------------------------------ drawing


def _check_classes(classes: Mapping[str, Colour]) -> dict[str, Colour]:
    out = {}
    for name, colour in classes.items():
        c = tuple(int(v) for v in colour)
        if len(c) != 3 or any(v not in (0, 255) for v in c) or len(set(c)) == 1:
            raise ValueError(f"class {name!r}: {colour} is not a pure colour (each channel 0 "
                             "or 255, not black or white)")
        out[str(name)] = c
    if not out:
        raise ValueError("no classes")
    return out


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Grey ground: low-frequency shading (80-180), grain, a faint per-channel tint and a
    few grey rectangles of clutter; every pixel stays far from any class colour."""
    cells = rng.integers(80, 181, (max(2, height // 300 + 2), max(2, width // 300 + 2)),
                         dtype=np.uint8)
    shade = np.asarray(Image.fromarray(cells, "L").resize((width, height),
                                                           Image.Resampling.BICUBIC),
                       dtype=np.int16)
    a = np.empty((height, width, 3), np.int16)
    a[:] = shade[..., None]
    for _ in range(int(rng.integers(3, 9))):  # clutter: darker or lighter grey rectangles
        w = int(rng.integers(max(2, width // 20), max(3, width // 4)))
        h = int(rng.integers(max(2, height // 20), max(3, height // 4)))
        x, y = int(rng.integers(0, max(1, width - w))), int(rng.integers(0, max(1, height - h)))
        a[y:y + h, x:x + w] += int(rng.choice([-40, -25, 25, 40]))
    a += rng.integers(-10, 11, (height, width, 1), dtype=np.int16)  # grain
    a += rng.integers(-4, 5, (1, width, 3), dtype=np.int16)  # a faint tint, column-wise
    np.clip(a, 40, 215, out=a)
    return a.astype(np.uint8)


def _placed(objects: Iterable[Any], classes: Mapping[str, Colour]) -> list[SceneObject]:
    out = []
    for o in objects:
        obj = o if isinstance(o, SceneObject) else SceneObject(str(o[0]), tuple(o[1]))
        if obj.label not in classes:
            raise ValueError(f"object {obj}: no colour for class {obj.label!r}")
        out.append(SceneObject(obj.label, tuple(int(v) for v in obj.box)))
    return out


def _place(width: int, height: int, count: int, sizes: Sequence[tuple[int, int]],
           names: list[str], gap: int, rng: np.random.Generator) -> list[SceneObject]:
    """``count`` rectangles at random places ``gap`` apart (and from the border): the
    size ranges in turn, the classes in turn every ``len(sizes)`` objects (so the sizes
    share the objects evenly and every class gets every size). ValueError when they do
    not fit."""
    wanted = []
    for i in range(count):
        lo, hi = sizes[i % len(sizes)]
        if not 1 <= lo <= hi:
            raise ValueError(f"bad size range {(lo, hi)}")
        w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
        wanted.append((i, names[(i // len(sizes)) % len(names)], w, h))
    taken: list[Box] = []
    placed: dict[int, SceneObject] = {}
    for i, name, w, h in sorted(wanted, key=lambda t: -t[2] * t[3]):  # large ones first
        if w + 2 * gap > width or h + 2 * gap > height:
            raise ValueError(f"a {w}x{h} object does not fit in {width}x{height} "
                             f"with a gap of {gap}")
        for _ in range(5000):
            x = int(rng.integers(gap, width - gap - w + 1))
            y = int(rng.integers(gap, height - gap - h + 1))
            box = (x, y, x + w, y + h)
            if all(box[0] >= t[2] + gap or t[0] >= box[2] + gap or box[1] >= t[3] + gap
                   or t[1] >= box[3] + gap for t in taken):
                taken.append(box)
                placed[i] = SceneObject(name, box)
                break
        else:
            raise ValueError(f"cannot place {count} objects of sizes {list(sizes)} in "
                             f"{width}x{height} with a gap of {gap}: fewer or smaller")
    return [placed[i] for i in range(count)]


def scene(width: int, height: int, objects: int | Iterable[Any] = 8, *, seed: int = 0,
          sizes: Sequence[tuple[int, int]] | None = None,
          classes: Mapping[str, Colour] | None = None, gap: int | None = None) -> Scene:
    """A ``width`` x ``height`` scene.

    ``objects``: how many rectangles to place at random (the sides of each drawn from
    the size ranges ``sizes`` in turn, default one range of 1/12 to 1/4 of the shorter
    side; the classes in turn every ``len(sizes)`` objects), or the objects themselves,
    as :class:`SceneObject` or ``(label, (x_min, y_min, x_max, y_max))`` (drawn as given,
    in order). ``classes``:
    name -> pure colour (default :data:`DEFAULT_CLASSES`). ``gap``: the least distance
    between two placed objects and from the border (default 1% of the shorter side, at
    least 8 px), so that objects stay apart when the image is shrunk several times.
    """
    if width < 1 or height < 1:
        raise ValueError(f"bad scene size {width}x{height}")
    colours = _check_classes(classes or DEFAULT_CLASSES)
    names = list(colours)
    rng = np.random.default_rng(seed)
    a = _background(width, height, rng)
    if isinstance(objects, int):
        short = min(width, height)
        ranges = list(sizes) if sizes else [(max(2, short // 12), max(2, short // 4))]
        margin = max(8, short // 100) if gap is None else int(gap)
        placed = _place(width, height, objects, ranges, names, margin, rng)
    else:
        placed = _placed(objects, colours)
    for obj in placed:
        x0, y0, x1, y1 = obj.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"object {obj} is not inside {width}x{height}")
        a[y0:y1, x0:x1] = colours[obj.label]
    return Scene(Image.fromarray(a, "RGB"), placed, names)


def scenes(count: int, width: int, height: int, objects: int | Iterable[Any] = 8, *,
           seed: int = 0, **options: Any) -> Iterator[Scene]:
    """``count`` scenes, the i-th made with seed ``seed + i`` (other options as
    :func:`scene`)."""
    for i in range(count):
        yield scene(width, height, objects, seed=seed + i, **options)


# ----------------------------------------------------------------------------- finding


def colour_boxes(image: Image.Image, classes: Mapping[str, Colour] | None = None, *,
                 min_size: int = 1) -> list[tuple[str, Box]]:
    """Every connected region of each class colour in ``image`` whose box is at least
    ``min_size`` pixels on both sides: ``(label, (x_min, y_min, x_max, y_max))`` in pixel
    edges of ``image``, class by class in ``classes`` order, then top to bottom and left
    to right.

    A pixel has a class when it is nearer that pure colour than the grey ground: the mean
    of its channels that are on in the colour, less the mean of those that are off,
    exceeds half the full value (127.5), and more than for any other class. A resize
    blends an edge pixel by how much of it the object covers, so the region found is the
    rectangle to within about half a pixel (a JPEG's colour blur: a pixel more)."""
    import cv2

    colours = _check_classes(classes or DEFAULT_CLASSES)
    a = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    channels = [a[..., k].astype(np.int16) for k in range(3)]
    scores, scales, masks = [], [], []
    for colour in colours.values():
        on = [channels[k] for k in range(3) if colour[k]]
        off = [channels[k] for k in range(3) if not colour[k]]
        # mean(on) - mean(off) > 127.5 in integers: both sides times 2 * len(on) * len(off)
        score = sum(on) * (2 * len(off)) - sum(off) * (2 * len(on))
        scores.append(score)
        scales.append(2 * len(on) * len(off))
        masks.append(score > 255 * len(on) * len(off))
    if len(masks) > 1:  # a pixel near two class colours goes to the nearer one
        count = np.zeros(a.shape[:2], np.uint8)
        for mask in masks:
            count += mask
        both = count > 1
        if both.any():
            best = np.argmax([score[both] / scale for score, scale
                              in zip(scores, scales, strict=True)], axis=0)
            for k, mask in enumerate(masks):
                mask[both] = best == k
    found = []
    for k, name in enumerate(colours):
        mask = masks[k].view(np.uint8)
        if not mask.any():
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:n]
                 if w >= min_size and h >= min_size]
        found.extend((name, b) for b in sorted(boxes, key=lambda b: (b[1], b[0])))
    return found


# ----------------------------------------------------------------------------- writing


def save_scene(s: Scene | Image.Image, path: str | Path, *, orientation: int = 1,
               quality: int = 95) -> Path:
    """Write the scene's image (format from the suffix: .jpg/.jpeg, .png, .webp, ...).
    ``orientation`` 2-8: stored turned, with that EXIF orientation tag, so that it shows
    (and grounding reads it) as the scene; 1 writes no tag."""
    path = Path(path)
    image = s.image if isinstance(s, Scene) else s
    if orientation not in _ORIENT_STORE:
        raise ValueError(f"EXIF orientation is 1-8, not {orientation}")
    method = _ORIENT_STORE[orientation]
    stored = image if method is None else image.transpose(method)
    options: dict[str, Any] = {}
    if path.suffix.lower() in (".jpg", ".jpeg", ".webp"):
        options["quality"] = quality
    elif path.suffix.lower() == ".png":
        options["compress_level"] = 1  # the grain does not compress: save time, not bytes
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, **options)
    return path


def coco_truth(items: Sequence[tuple[str, Scene]], classes: Sequence[str] | None = None
               ) -> dict[str, Any]:
    """COCO ground truth for ``(file_name, scene)`` pairs: categories 1..n in class
    order (default: the first scene's classes), boxes ``[x, y, width, height]`` in the
    displayed frame."""
    names = list(classes) if classes is not None else (
        list(items[0][1].classes) if items else list(DEFAULT_CLASSES))
    return _coco([(name, s.size, s.objects) for name, s in items], names)


def _coco(entries: Sequence[tuple[str, tuple[int, int], Sequence[SceneObject]]],
          names: Sequence[str]) -> dict[str, Any]:
    ids = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for i, (name, (w, h), objects) in enumerate(entries):
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for o in objects:
            x0, y0, x1, y1 = o.box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": ids[o.label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": ids[n], "name": n} for n in names]}


@dataclass
class SceneDataset:
    """What :func:`write_dataset` wrote."""

    root: Path
    images_dir: Path
    truth: Path
    """COCO ground truth; its ``file_name`` entries are relative to ``images_dir``."""
    classes: list[str]
    files: list[str]
    objects: int
    """Objects in all scenes."""


def write_dataset(root: str | Path, items: Iterable[Scene], *, image_format: str = "jpg",
                  quality: int = 95, orientations: Sequence[int] = (1,),
                  prefix: str = "scene") -> SceneDataset:
    """Write each scene as ``root/images/{prefix}_{i:03d}.{image_format}`` (JPEG quality
    ``quality``; ``png`` for exact pixels) and their ground truth as ``root/truth.json``
    (COCO, what ``grounding eval --gt`` reads). ``orientations`` are taken in turn per
    image (e.g. ``(1, 6, 3, 8)``): EXIF-rotated files whose truth is in the displayed
    frame (see :func:`save_scene`)."""
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    ext = image_format.lower().lstrip(".")
    # only what the truth needs is kept: the images of a large set do not pile up
    written: list[tuple[str, tuple[int, int], list[SceneObject]]] = []
    classes: list[str] | None = None
    for i, s in enumerate(items):
        name = f"{prefix}_{i:03d}.{ext}"
        save_scene(s, images_dir / name, orientation=orientations[i % len(orientations)],
                   quality=quality)
        written.append((name, s.size, list(s.objects)))
        classes = classes or list(s.classes)
    classes = classes or list(DEFAULT_CLASSES)
    truth = root / "truth.json"
    truth.write_text(json.dumps(_coco(written, classes), indent=1) + "\n", encoding="utf-8")
    return SceneDataset(root, images_dir, truth, classes, [w[0] for w in written],
                        sum(len(w[2]) for w in written))
