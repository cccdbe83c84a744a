"""grounding.backends.segment.SamSegmenter on the tiny random-weight SAM 2 checkpoint.

Random weights: the tests check shapes, frames, accounting (one image embedding per
image, one decoder pass per batch, no pass for an image without boxes), batching and
determinism, never what the masks hold, except through a test-only replacement of the
model's mask logits by the box itself, which proves the coordinate chain
(displayed box -> model input -> low-res mask -> displayed frame) exact.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from PIL import Image

from grounding import GroundingError, load_image
from grounding.backends.local import ModelLoadError
from grounding.backends.segment import DEFAULT_MASK_MODEL, MaskResult, SamSegmenter
from grounding.core.masks import decode
from grounding.testing.tiny import TINY_SAM2_IMAGE_SIZE, build_tiny_sam2, tiny_sam2

SIZES = [(400, 300), (640, 480), (150, 200)]  # (width, height)
BOXES = [
    np.array([[10, 20, 100, 200], [50, 50, 300, 250]], dtype=float),
    np.array([[0, 0, 640, 480], [10.5, 10.2, 20.7, 20.1], [100, 100, 400, 300]], dtype=float),
    np.array([[5, 5, 60, 60], [20, 30, 140, 190], [0, 100, 150, 200], [70, 10, 80, 20],
              [1, 1, 149, 199]], dtype=float),
]


@pytest.fixture(scope="module")
def segmenter() -> SamSegmenter:
    return SamSegmenter(str(tiny_sam2()), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in SIZES]


class Calls:
    """Counts forward calls of a module and the batch size each saw."""

    def __init__(self, module) -> None:
        self.batches: list[int] = []
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        first = args[0] if args else None
        self.batches.append(int(first.shape[0]) if hasattr(first, "shape") else -1)

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture
def counting(segmenter):
    encoder = Calls(segmenter.net.vision_encoder)
    decoder = Calls(segmenter.net.mask_decoder)
    yield encoder, decoder
    encoder.close()
    decoder.close()


def test_default_model_name():
    assert DEFAULT_MASK_MODEL == "facebook/sam2.1-hiera-large"


def test_shapes_and_sizes(segmenter, images):
    results = segmenter.segment(images, BOXES)
    assert len(results) == len(images)
    for image, boxes, found in zip(images, BOXES, results, strict=True):
        assert len(found) == len(boxes)
        for m in found:
            assert isinstance(m, MaskResult)
            assert m.rle["size"] == [image.height, image.width]
            assert isinstance(m.rle["counts"], str)
            mask = decode(m.rle)
            assert mask.shape == (image.height, image.width)
            assert m.area == int(mask.sum())
            assert isinstance(m.score, float) and math.isfinite(m.score)
            assert m.problem in (None, "empty", "outside_box")


def test_one_embedding_per_image_one_decoder_pass_per_batch(segmenter, images, counting):
    encoder, decoder = counting
    segmenter.segment(images, BOXES)  # 2, 3 and 5 boxes
    assert encoder.batches == [3]  # one vision-encoder call for the batch of 3
    assert len(decoder.batches) == 1  # one decoder pass for all 10 boxes


def test_batches_split_at_batch_size(segmenter, images, counting):
    encoder, decoder = counting
    segmenter.batch_size = 1
    try:
        segmenter.segment(images, BOXES)
    finally:
        segmenter.batch_size = 8
    assert encoder.batches == [1, 1, 1]  # once per image, never per box
    assert len(decoder.batches) == 3


def test_batching_equals_one_at_a_time(segmenter, images):
    together = segmenter.segment(images, BOXES)
    alone = [segmenter.segment([im], [b])[0] for im, b in zip(images, BOXES, strict=True)]
    reversed_ = segmenter.segment(images[::-1], BOXES[::-1])[::-1]
    for run in (alone, reversed_):
        for a_masks, b_masks in zip(together, run, strict=True):
            assert len(a_masks) == len(b_masks)
            for a, b in zip(a_masks, b_masks, strict=True):
                assert a.rle == b.rle
                assert a.area == b.area
                assert a.score == pytest.approx(b.score, abs=1e-5)


def test_deterministic_across_loads(segmenter, images):
    again = SamSegmenter(str(tiny_sam2()), device="cpu")
    first = segmenter.segment(images[:1], BOXES[:1])
    second = again.segment(images[:1], BOXES[:1])
    assert [m.rle for m in first[0]] == [m.rle for m in second[0]]
    assert [m.score for m in first[0]] == [m.score for m in second[0]]


def test_tiny_sam2_build_is_deterministic(tmp_path):
    a = build_tiny_sam2(tmp_path / "a")
    b = tiny_sam2(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    from transformers import Sam2Model, Sam2Processor

    processor = Sam2Processor.from_pretrained(a)
    assert processor.image_processor.size["height"] == TINY_SAM2_IMAGE_SIZE
    assert Sam2Model.from_pretrained(a).config.model_type == "sam2"


def test_zero_boxes_no_forward(segmenter, images, counting):
    encoder, decoder = counting
    empty = np.zeros((0, 4))
    assert segmenter.segment(images, [empty, empty, empty]) == [[], [], []]
    assert segmenter.segment([], []) == []
    assert encoder.batches == [] and decoder.batches == []
    # Mixed: only the images with boxes go through the encoder.
    found = segmenter.segment(images, [BOXES[0], empty, BOXES[2]])
    assert [len(f) for f in found] == [2, 0, 5]
    assert encoder.batches == [2]


def test_mismatched_lengths(segmenter, images):
    with pytest.raises(ValueError, match="images but"):
        segmenter.segment(images, BOXES[:2])


def test_non_rgb_input(segmenter, images):
    gray = images[0].convert("L")
    found = segmenter.segment([gray], [BOXES[0]])
    assert found[0][0].rle["size"] == [gray.height, gray.width]


# --------------------------------------------------------------------------------------
# Geometry: EXIF-rotated input, masks in the displayed frame, exact to a pixel.
# --------------------------------------------------------------------------------------

def _box_logits(boxes, side: int, low: int):
    """Mask logits that are the signed distance (in model-input pixels) to each box's
    edge, sampled at the low-res cell centres: positive inside, zero on the edge. Linear
    along each edge, so bilinear upsampling puts the zero crossing on the edge exactly."""
    import torch

    centres = (torch.arange(low, dtype=torch.float32) + 0.5) * side / low
    x1, y1, x2, y2 = (boxes[..., k, None, None] for k in range(4))
    cx = centres[None, None, None, :]
    cy = centres[None, None, :, None]
    return torch.minimum(torch.minimum(cx - x1, x2 - cx), torch.minimum(cy - y1, y2 - cy))


@pytest.fixture
def box_masks(segmenter, monkeypatch):
    """Replace the model's mask logits by the box it was prompted with."""
    net = segmenter.net
    original = net.forward
    seen: list = []

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        boxes = kwargs["input_boxes"].float().cpu()  # (images, boxes, 4), model input frame
        seen.append(boxes.clone())
        low = out.pred_masks.shape[-1]
        out.pred_masks = _box_logits(boxes, TINY_SAM2_IMAGE_SIZE, low)[:, :, None].to(
            out.pred_masks)
        return out

    monkeypatch.setattr(net, "forward", forward)
    return seen


def _check_box_mask(mask: np.ndarray, box, low: int = TINY_SAM2_IMAGE_SIZE // 4) -> None:
    """Every pixel of ``mask`` (shape h, w) is set iff its centre is inside ``box``, except
    pixels whose centre lies within 1 px of the box's outline, or within one low-res mask
    cell of a corner (where the distance function has a kink, which bilinear upsampling
    rounds off)."""
    h, w = mask.shape
    x1, y1, x2, y2 = box
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    inside = ((xs[None, :] > x1) & (xs[None, :] < x2)
              & (ys[:, None] > y1) & (ys[:, None] < y2))
    # distance of each pixel centre to the outline
    dx = np.minimum(np.abs(xs - x1), np.abs(xs - x2))[None, :]
    dy = np.minimum(np.abs(ys - y1), np.abs(ys - y2))[:, None]
    near_x = (dx <= 1.0) & (ys[:, None] >= y1 - 1) & (ys[:, None] <= y2 + 1)
    near_y = (dy <= 1.0) & (xs[None, :] >= x1 - 1) & (xs[None, :] <= x2 + 1)
    cell_x, cell_y = w / low, h / low
    corner = ((np.minimum(np.abs(xs - x1), np.abs(xs - x2))[None, :] <= cell_x)
              & (np.minimum(np.abs(ys - y1), np.abs(ys - y2))[:, None] <= cell_y))
    wrong = (mask != inside) & ~(near_x | near_y | corner)
    assert not wrong.any(), f"{wrong.sum()} pixels off, e.g. at {np.argwhere(wrong)[:3]}"
    # And the mask does reach the outline: its extent along the middle row/column.
    row = mask[int((y1 + y2) / 2)]
    col = mask[:, int((x1 + x2) / 2)]
    assert abs(np.flatnonzero(row)[0] - x1) <= 1 and abs(np.flatnonzero(row)[-1] + 1 - x2) <= 1
    assert abs(np.flatnonzero(col)[0] - y1) <= 1 and abs(np.flatnonzero(col)[-1] + 1 - y2) <= 1


def test_box_logits_make_box_masks(segmenter, images, box_masks):
    boxes = [np.array([[40.3, 30.6, 250.2, 170.9], [200, 120, 390, 290]]),
             np.array([[13.7, 200.2, 600.4, 470.5]])]
    found = segmenter.segment(images[:2], boxes)
    assert len(box_masks) == 1
    for image, image_boxes, masks in zip(images, boxes, found, strict=False):
        for box, m in zip(image_boxes, masks, strict=True):
            mask = decode(m.rle)
            assert mask.shape == (image.height, image.width)
            _check_box_mask(mask, box)
            assert m.problem is None


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_masks_in_displayed_frame_for_exif_rotated_input(segmenter, tmp_path, orientation,
                                                         box_masks):
    stored_w, stored_h = 200, 120
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (stored_h, stored_w, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=90)

    image = load_image(path)
    rotated = orientation in (5, 6, 7, 8)
    assert image.size == ((stored_h, stored_w) if rotated else (stored_w, stored_h))
    w, h = image.size
    box = np.array([0.12 * w + 0.3, 0.2 * h + 0.6, 0.8 * w + 0.2, 0.85 * h + 0.4])
    (found,) = segmenter.segment([image], [box[None]])
    # The processor was given the displayed size: the box reached the model scaled from it.
    side = TINY_SAM2_IMAGE_SIZE
    np.testing.assert_allclose(box_masks[0][0, 0].numpy(),
                               box * np.array([side / w, side / h, side / w, side / h]),
                               rtol=1e-5)
    mask = decode(found[0].rle)
    assert found[0].rle["size"] == [h, w]
    assert mask.shape == (h, w)
    _check_box_mask(mask, box)


def test_real_logits_on_rotated_input_have_displayed_size(segmenter, tmp_path):
    stored = Image.fromarray(np.full((90, 160, 3), 100, dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "o6.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (90, 160)
    (found,) = segmenter.segment([image], [np.array([[10, 20, 80, 150]])])
    assert found[0].rle["size"] == [160, 90]


# --------------------------------------------------------------------------------------
# Loading errors: one line, GroundingError.
# --------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


def test_missing_directory(tmp_path):
    with pytest.raises(GroundingError) as info:
        SamSegmenter(str(tmp_path / "nowhere"), device="cpu")
    assert isinstance(info.value, ModelLoadError)
    assert "--mask-model" in _one_line(info.value)
    assert "no such checkpoint directory" in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(GroundingError) as info:
        SamSegmenter(str(tmp_path), device="cpu")
    assert "not a transformers checkpoint directory" in _one_line(info.value)


def test_not_a_sam_checkpoint(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(GroundingError) as info:
        SamSegmenter(str(tmp_path), device="cpu")
    assert "not a box-promptable SAM" in _one_line(info.value)


def test_uncached_hub_id_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GroundingError) as info:
        SamSegmenter("nobody-here/no-such-sam-model", device="cpu")
    assert "not in the local cache" in _one_line(info.value)


def test_bad_device():
    with pytest.raises(GroundingError, match="--device"):
        SamSegmenter(str(tiny_sam2()), device="gpu7")


def test_speed_per_image(segmenter, images):
    """The tiny model's cost per image on the CPU (printed; a loose bound)."""
    segmenter.segment(images, BOXES)  # warm
    start = time.perf_counter()
    for _ in range(3):
        segmenter.segment(images, BOXES)
    per_image = (time.perf_counter() - start) / (3 * len(images))
    print(f"tiny SAM 2: {per_image * 1000:.1f} ms per image ({sum(map(len, BOXES))} boxes "
          f"over {len(images)} images)")
    assert per_image < 2.0
