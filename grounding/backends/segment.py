"""Box-prompted segmentation with SAM 2 through transformers: one mask per detected box.

``SamSegmenter(model).segment(images, boxes)`` takes upright RGB images and, per image,
its boxes (n, 4) xyxy in that image's pixels (the displayed frame grounding's boxes are
in), and returns per image per box a :class:`MaskResult`: the mask as COCO RLE in the
same pixel frame (same size as the image), SAM's predicted IoU as the score, the area,
and why the mask is suspect (grounding.core.masks.mask_check), if it is.

How it runs (the accounting tests/test_segment.py checks):

- Images with no box are skipped: no forward pass at all.
- The others go in batches of up to ``batch_size``: ONE vision-encoder call per batch
  (``get_image_embeddings``: SAM's image embedding, computed once per image), then ONE
  prompt-encoder + mask-decoder call for every box of every image of the batch, fed the
  embeddings (``image_embeddings=``), never the pixels again.
- Images with different numbers of boxes: each image's boxes are padded to the batch's
  largest count by repeating its last box; the padded rows are dropped. The mask decoder
  treats every (image, box) pair on its own, so padding changes no real box's mask
  (batch of 3 == one at a time, tested).
- ``multimask_output=False``: the mask of SAM's single-mask token, which SAM's authors
  recommend for unambiguous prompts such as boxes (SAM 2's image predictor and
  Grounded-SAM-2 call it so for boxes). SAM 2's decoder then falls back to the best of
  its three multimask outputs (by predicted IoU) when that mask is unstable
  (``dynamic_multimask_via_stability``), so a box still gets the best mask SAM 2 has.
  The score is the predicted IoU of the mask returned.
- Masks are upsampled from SAM's low-resolution logits straight to each image's own
  size (the processor's ``post_process_masks``: the image was stretched, not padded, to
  the model's square input, so the mapping back is the inverse stretch) and thresholded
  at 0; boxes are mapped into the model's input frame by the processor (x * side / W).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from grounding.backends.local import ModelLoadError, load_config, resolve_model
from grounding.backends.placement import Machine, check_device, plan
from grounding.core.masks import area, encode, mask_check

__all__ = ["DEFAULT_MASK_MODEL", "MASK_MODEL_TYPES", "MaskResult", "SamSegmenter"]

log = logging.getLogger("grounding")

DEFAULT_MASK_MODEL = "facebook/sam2.1-hiera-large"
"""The default segmenter. SAM 2.1 Hiera-L is the most accurate box-promptable SAM-family
image checkpoint transformers loads with the SAM 2 classes (Apache-2.0, not gated; the
segmenter Grounded-SAM-2 and autodistill's Grounded-SAM-2 use). transformers 5.24 also
ships SAM 3: ``Sam3Model`` segments by concept (text, or boxes as *exemplars* that find
every similar instance), which is not "segment this box"; ``Sam3TrackerModel`` does take
box prompts as SAM 2 does (the same processor and decoder interface), but facebook/sam3
is gated behind a licence request, so it is a choice (``--mask-model facebook/sam3``)
rather than the default."""

MASK_MODEL_TYPES = ("sam2", "sam3_tracker", "sam3_video")
"""Checkpoint ``model_type``s loaded: SAM 2 / 2.1, and SAM 3's tracker (``sam3_video`` is
the facebook/sam3 checkpoint, whose tracker part ``Sam3TrackerModel`` loads; the SAM 3
path shares SAM 2's interface but is tested only on SAM 2 here, no SAM 3 weights)."""


@dataclass(frozen=True)
class MaskResult:
    """One box's mask."""

    rle: dict
    """COCO compressed RLE, ``{"size": [height, width], "counts": str}``, in the image's
    pixel frame (the frame of the box)."""
    score: float
    """The segmenter's predicted IoU for this mask."""
    area: int
    """Pixels in the mask."""
    problem: str | None = None
    """Why the mask is suspect ("empty", "outside_box": grounding.core.masks), or None."""


def _classes(model_type: str) -> tuple[Any, Any]:
    if model_type == "sam2":
        from transformers import Sam2Model, Sam2Processor

        return Sam2Model, Sam2Processor
    from transformers import Sam3TrackerModel, Sam3TrackerProcessor

    return Sam3TrackerModel, Sam3TrackerProcessor


@dataclass(frozen=True)
class SegmenterSpec:
    """A mask model named and checked, not loaded (see :meth:`SamSegmenter.describe`)."""

    model: str


def _mask_model(model: str) -> tuple[str, bool, str]:
    """(source, offline, model type) of a mask checkpoint; ModelLoadError in one line
    naming --mask-model when it cannot be had or is not a box-promptable SAM."""
    try:
        source, offline = resolve_model(model)
    except ModelLoadError as exc:
        raise ModelLoadError(str(exc).replace("--model", "--mask-model", 1)) from None
    from transformers import AutoConfig

    config = load_config(AutoConfig, model, source, offline,
                         option="--mask-model", what="mask model", hint=_mask_hint)
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in MASK_MODEL_TYPES:
        raise ModelLoadError(
            f"--mask-model {model}: a {model_type or 'unknown'!r} checkpoint, "
            f"not a box-promptable SAM ({', '.join(MASK_MODEL_TYPES)})")
    return source, offline, model_type


class SamSegmenter:
    """A loaded SAM 2 (or SAM 3 tracker) model and processor; see the module docstring.

    ``device``: None puts it on the first GPU when there is one, else the CPU (as the
    local backend, grounding.backends.placement). ``dtype``: float32 by default, on GPUs
    too: the prompt encoder casts box coordinates to the weights' dtype, and in bfloat16
    a corner at 1024 px moves by up to 4 px; pass "bfloat16" for speed over that.
    ``batch_size``: images per vision-encoder call (the caller's batch is split).
    A missing model, a bad path or a checkpoint that is not SAM 2/3 raises one
    :class:`~grounding.backends.local.ModelLoadError` line.
    """

    @staticmethod
    def describe(model: str = DEFAULT_MASK_MODEL) -> SegmenterSpec:
        """The mask model checked from its config alone (no weights): what a driver whose
        segmenter runs elsewhere (the Ray engine's workers) records, failing here in one
        line on a checkpoint that is missing or not a box-promptable SAM."""
        _mask_model(str(model))
        return SegmenterSpec(str(model))

    def __init__(self, model: str = DEFAULT_MASK_MODEL, *, device: str | None = None,
                 dtype: str | None = "float32", batch_size: int = 8) -> None:
        self.model = str(model)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        check_device(device)
        self.placement = plan(Machine.probe(), device, dtype)
        source, offline, self.model_type = _mask_model(self.model)
        model_cls, processor_cls = _classes(self.model_type)
        try:
            self.processor = processor_cls.from_pretrained(source, local_files_only=offline)
            self.net = model_cls.from_pretrained(
                source, local_files_only=offline, dtype=self.placement.torch_dtype(),
                device_map=self.placement.device_map)
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ModelLoadError(_mask_hint(self.model, exc)) from None
        self.net.eval()
        self.device = self.placement.device
        if not self.placement.on_gpu:
            log.info("grounding: segmenting with %s on the CPU", self.model)

    def segment(self, images: list[Image.Image],
                boxes: list[np.ndarray]) -> list[list[MaskResult]]:
        """Per image, per box (in the order given), its :class:`MaskResult`."""
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        arrays = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in boxes]
        out: list[list[MaskResult]] = [[] for _ in images]
        todo = [i for i, b in enumerate(arrays) if len(b)]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            found = self._segment_batch([images[i] for i in chunk], [arrays[i] for i in chunk])
            for i, masks in zip(chunk, found, strict=True):
                out[i] = masks
        return out

    def _segment_batch(self, images: list[Image.Image],
                       boxes: list[np.ndarray]) -> list[list[MaskResult]]:
        import torch

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        sizes = [[im.height, im.width] for im in rgb]
        most = max(len(b) for b in boxes)
        # Pad each image's boxes to the batch's largest count with copies of its last box.
        padded = [np.concatenate([b, np.repeat(b[-1:], most - len(b), axis=0)]).tolist()
                  for b in boxes]
        with torch.inference_mode():
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
            prompts = self.processor(input_boxes=padded, original_sizes=sizes,
                                     return_tensors="pt")["input_boxes"]
            pixels = pixels.to(self.device, dtype=self.net.dtype)
            embeddings = self.net.get_image_embeddings(pixels)
            result = self.net(image_embeddings=embeddings, input_boxes=prompts.to(self.device),
                              multimask_output=False)
            logits = result.pred_masks[:, :, 0].float()  # (images, boxes, h, w)
            scores = result.iou_scores[:, :, 0].float().cpu().numpy()
            out = []
            for i, (image_boxes, size) in enumerate(zip(boxes, sizes, strict=True)):
                found = []
                for j0 in range(0, len(image_boxes), _POSTPROCESS_CHUNK):
                    j1 = min(j0 + _POSTPROCESS_CHUNK, len(image_boxes))
                    masks = self.processor.post_process_masks(
                        [logits[i, j0:j1, None]], [size])[0][:, 0].cpu().numpy()
                    for j, mask in zip(range(j0, j1), masks, strict=True):
                        rle = encode(mask)
                        found.append(MaskResult(rle=rle, score=float(scores[i, j]),
                                                area=area(rle),
                                                problem=mask_check(mask, image_boxes[j])))
                out.append(found)
        return out


_POSTPROCESS_CHUNK = 16
"""Boxes upsampled to full image size at once (bounds the full-size masks in memory)."""


def _mask_hint(model: str, exc: BaseException) -> str:
    text = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
    return f"cannot load mask model {model!r}: {text}"
