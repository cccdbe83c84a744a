"""grounding.core.masks: COCO RLE round trips, area, and the mask checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grounding.core.masks import OUTSIDE_BOX_SHARE, area, decode, encode, mask_check


def _random_masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), dtype=bool)
    yield np.ones((3, 4), dtype=bool)
    yield np.zeros((1, 1), dtype=bool)
    yield np.ones((1, 1), dtype=bool)
    for shape in ((10, 13), (64, 48), (1, 50), (50, 1)):
        yield rng.random(shape) > 0.5
    blob = np.zeros((40, 60), dtype=bool)
    blob[5:30, 10:45] = True
    blob[12:18, 20:25] = False
    yield blob


@pytest.mark.parametrize("mask", list(_random_masks()))
def test_round_trip(mask):
    rle = encode(mask)
    assert rle["size"] == [mask.shape[0], mask.shape[1]]
    assert isinstance(rle["counts"], str)
    assert json.loads(json.dumps(rle)) == rle
    back = decode(rle)
    assert back.dtype == bool and back.shape == mask.shape
    assert np.array_equal(back, mask)
    assert area(rle) == int(mask.sum())


def test_encode_accepts_c_order_and_non_bool():
    mask = np.zeros((6, 9), dtype=np.uint8)
    mask[1:4, 2:7] = 255
    assert np.array_equal(decode(encode(mask)), mask > 0)
    assert np.array_equal(decode(encode(mask.T.copy().T)), mask > 0)


def test_matches_pycocotools_and_bytes_counts():
    from pycocotools import mask as mask_utils

    mask = np.zeros((20, 30), dtype=bool)
    mask[3:11, 4:25] = True
    ours = encode(mask)
    theirs = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    assert ours["counts"].encode("ascii") == theirs["counts"]
    assert np.array_equal(decode(theirs), mask)  # bytes counts decode too
    assert area(theirs) == mask.sum()


def test_uncompressed_rle_decodes():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:4] = True
    # COCO's uncompressed RLE: column-major run lengths starting with zeros.
    flat = mask.flatten(order="F")
    counts, value, run = [], False, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    rle = {"size": [4, 5], "counts": counts}
    assert np.array_equal(decode(rle), mask)
    assert area(rle) == 6


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 3, 4), dtype=bool))


def test_check_empty():
    mask = np.zeros((10, 10), dtype=bool)
    assert mask_check(mask, (1, 1, 5, 5)) == "empty"
    assert mask_check(encode(mask), (1, 1, 5, 5)) == "empty"


def test_check_inside_and_partly_outside():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:8, 2:8] = True
    assert mask_check(mask, (2, 2, 8, 8)) is None
    assert mask_check(encode(mask), (2, 2, 8, 8)) is None
    # Fractional edges: pixels the box touches count as inside.
    assert mask_check(mask, (2.6, 2.6, 7.2, 7.2)) is None
    # Half outside is still fine (not *more* than the share).
    assert OUTSIDE_BOX_SHARE == 0.5
    assert mask_check(mask, (2, 2, 5, 8)) is None


def test_check_mostly_outside():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:8, 2:8] = True
    assert mask_check(mask, (2, 2, 4, 8)) == "outside_box"  # 12 of 36 inside
    assert mask_check(mask, (10, 10, 19, 19)) == "outside_box"
    assert mask_check(encode(mask), (10, 10, 19, 19)) == "outside_box"


def test_check_box_beyond_image_and_reversed_edges():
    mask = np.zeros((10, 10), dtype=bool)
    mask[5:, 5:] = True
    assert mask_check(mask, (4, 4, 50, 50)) is None
    assert mask_check(mask, (50, 50, 4, 4)) is None
    assert mask_check(mask, (-10, -10, -1, -1)) == "outside_box"
