"""The detector parity check: the same detections within the bounds, tied scores in either order."""

import pytest
import torch

from tritondet.bench.inputs import BOX_ATOL, SCORE_ATOL, assert_same_detections


def detections(boxes, scores, labels) -> list[dict]:
    return [{"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}]


BOXES = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]]


def test_tied_scores_may_swap_and_bounds_hold():
    theirs = detections(BOXES, [0.9, 0.5, 0.5], [1, 2, 3])
    swapped = detections([BOXES[0], BOXES[2], BOXES[1]], [0.9, 0.5 + SCORE_ATOL / 2, 0.5], [1, 3, 2])
    assert_same_detections(swapped, theirs)
    nudged = detections([[b + BOX_ATOL / 2 for b in box] for box in BOXES], [0.9, 0.5, 0.5], [1, 2, 3])
    assert_same_detections(nudged, theirs)
    empty = detections(torch.zeros(0, 4).tolist(), [], [])
    empty[0]["labels"] = empty[0]["labels"].long()
    assert_same_detections(empty, [{k: v.clone() for k, v in empty[0].items()}])


@pytest.mark.parametrize(
    "boxes, scores, labels",
    [
        (BOXES, [0.9, 0.5, 0.5], [1, 2, 2]),  # a label differs
        ([BOXES[0], BOXES[1], [1.0, 2.0, 3.0, 4.1]], [0.9, 0.5, 0.5], [1, 2, 3]),  # a box beyond BOX_ATOL
        (BOXES, [0.9, 0.5, 0.5 + 2 * SCORE_ATOL], [1, 2, 3]),  # a score beyond SCORE_ATOL
        ([BOXES[1], BOXES[0], BOXES[2]], [0.9, 0.9, 0.5], [2, 1, 3]),  # a swap of untied scores
        (BOXES[:2], [0.9, 0.5], [1, 2]),  # one detection fewer
    ],
)
def test_differences_are_caught(boxes, scores, labels):
    theirs = detections(BOXES, [0.9, 0.5, 0.5], [1, 2, 3])
    with pytest.raises(AssertionError):
        assert_same_detections(detections(boxes, scores, labels), theirs)


def test_dtypes_must_match():
    theirs = detections(BOXES, [0.9, 0.5, 0.5], [1, 2, 3])
    ours = detections(BOXES, [0.9, 0.5, 0.5], [1, 2, 3])
    ours[0]["labels"] = ours[0]["labels"].int()
    with pytest.raises(AssertionError, match="labels"):
        assert_same_detections(ours, theirs)
