import pytest
import torch
from PIL import Image

from openmae.dense.data import IGNORE_INDEX
from openmae.dense.draw import DRAW_MIN_SIDE, palette, save_detection_grid, save_segmentation_grid, to_uint8
from openmae.dense.metrics import DetectionMetrics, SegmentationMetrics

# -- segmentation ------------------------------------------------------------------------------

TARGET = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
PRED = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1], [2, 2, 2, 1], [2, 2, 0, 0]])
# by hand, over the 14 labelled pixels:
#   class 0: target 4, predicted 4, both 3 -> IoU 3/5;  class 1: 4, 5, 3 -> 3/6;  class 2: 6, 5, 5 -> 5/6
#   pixel accuracy 11/14; class accuracies 3/4, 3/4, 5/6


def test_segmentation_metrics_by_hand():
    m = SegmentationMetrics(3, ["a", "b", "c"])
    m.update(PRED[None], TARGET[None])
    out = m.compute()
    assert out["iou"] == pytest.approx({"a": 60.0, "b": 50.0, "c": 83.3333}, abs=1e-4)
    assert out["miou"] == pytest.approx(100 * (3 / 5 + 3 / 6 + 5 / 6) / 3, abs=1e-4)
    assert out["acc"] == pytest.approx(100 * 11 / 14, abs=1e-4)
    assert out["macc"] == pytest.approx(100 * (3 / 4 + 3 / 4 + 5 / 6) / 3, abs=1e-4)


def test_segmentation_metrics_take_scores_and_accumulate():
    scores = torch.nn.functional.one_hot(PRED.clamp(max=2), 3).permute(2, 0, 1).float()  # (K, H, W)
    whole = SegmentationMetrics(3)
    whole.update(PRED[None], TARGET[None])
    halves = SegmentationMetrics(3)
    halves.update(scores[None, :, :2], TARGET[None, :2])  # (N, K, H, W) scores: argmax taken
    halves.update(PRED[None, 2:], TARGET[None, 2:])
    assert halves.compute() == whole.compute()
    merged = SegmentationMetrics(3)
    other = SegmentationMetrics(3)
    merged.update(PRED[None, :2], TARGET[None, :2])
    other.update(PRED[None, 2:], TARGET[None, 2:])
    merged.merge_state(other)  # what the DDP sync does: the confusion matrices add up
    assert merged.compute() == whole.compute()


def test_miou_averages_over_classes_with_a_non_empty_union():
    target = torch.tensor([[0, 0], [1, 1]])
    m = SegmentationMetrics(4, ["bg", "x", "y", "z"])
    m.update(torch.tensor([[0, 0], [1, 2]])[None], target[None])
    out = m.compute()
    # x: 1/2; y predicted once, never present: 0 (counts); z in neither: None (left out)
    assert out["iou"] == {"bg": 100.0, "x": 50.0, "y": 0.0, "z": None}
    assert out["miou"] == pytest.approx(50.0)
    assert out["macc"] == pytest.approx(75.0)  # over the classes in the ground truth: bg 1, x 1/2
    empty = SegmentationMetrics(2)
    empty.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), IGNORE_INDEX))
    assert empty.compute()["miou"] is None and empty.compute()["acc"] is None


# -- detection ---------------------------------------------------------------------------------


def box_target(boxes, labels, size=32):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(torch.tensor(boxes).long().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "masks": masks}


def test_a_perfect_detection_scores_100():
    target = box_target([[4, 4, 14, 14], [16, 10, 30, 28]], [1, 2])
    pred = dict(target, scores=torch.tensor([0.9, 0.8]))
    m = DetectionMetrics(masks=True, class_names=["background", "a", "b"])
    m.update([pred], [target])
    out = m.compute()
    for key in ("map", "map_50", "map_75", "mask_map", "mask_map_50", "mask_map_75"):
        assert out[key] == 100.0, key
    assert out["map_large"] is None  # no object above 96^2 px: nothing to score


def test_a_box_at_iou_061_counts_at_50_and_not_at_75():
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    pred = {"boxes": torch.tensor([[0.0, 0, 10, 6.1]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    m = DetectionMetrics(masks=False, class_names=["background", "a"], class_metrics=True)
    m.update([pred], [target])
    out = m.compute()
    assert out["map_50"] == 100.0 and out["map_75"] == 0.0
    assert out["map"] == pytest.approx(30.0)  # matched at IoU thresholds .50, .55, .60 of the ten
    assert out["ap"] == {"a": pytest.approx(30.0)}
    assert "mask_map" not in out
    with pytest.raises(ValueError, match="masks=False"):
        DetectionMetrics().update([pred], [target])


def test_mask_rcnn_outputs_are_thresholded():
    target = box_target([[4, 4, 20, 20]], [1])
    probabilities = target["masks"][:, None].float() * 0.9 + 0.05  # (n, 1, H, W), as Mask R-CNN gives them
    pred = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.tensor([0.7]), "masks": probabilities}
    m = DetectionMetrics()
    m.update([pred], [target])
    out = m.compute()
    assert out["mask_map"] == 100.0 and out["map"] == 100.0
    wrong = dict(pred, labels=torch.tensor([2]))
    m.reset()
    m.update([wrong], [target])
    assert m.compute()["map"] == 0.0


# -- drawings ----------------------------------------------------------------------------------


def test_palette_is_fixed_and_distinct():
    assert palette(12) == palette(12) and len(set(palette(12))) == 12
    assert palette(3) == palette(12)[:3]


def test_segmentation_grid_is_written_at_the_expected_size(tmp_path):
    images = torch.randn(3, 1, 32, 48)
    targets = torch.randint(0, 4, (3, 32, 48))
    targets[:, :4] = IGNORE_INDEX
    scores = torch.randn(3, 4, 32, 48)
    path = save_segmentation_grid(
        tmp_path / "seg.png",
        images,
        scores,
        targets,
        mean=[0.3],
        std=[0.3],
        class_names=["background", "a", "b", "c"],
        scale=2,
    )
    assert Image.open(path).size == (3 * (48 * 2 + 2) + 2, 3 * (32 * 2 + 2) + 2)
    path = save_segmentation_grid(
        tmp_path / "pred.png",
        images,
        scores.argmax(1),
        mean=[0.3],
        std=[0.3],
        class_names=list("wxyz"),
        scale=1,
        max_images=2,
    )
    assert Image.open(path).size == (2 * (48 + 2) + 2, 2 * (32 + 2) + 2)


def test_segmentation_grid_colours_the_classes(tmp_path):
    images = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :, 4:] = 1
    path = save_segmentation_grid(
        tmp_path / "s.png",
        images,
        mask,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        class_names=["background", "thing"],
        scale=1,
        alpha=1.0,
    )
    picture = torch.from_numpy(__import__("numpy").asarray(Image.open(path)))  # (H, W, 3)
    prediction = picture[2:10, 12:20]  # second panel: after 2 px padding, the first 8 px panel and 2 px
    assert (prediction[:, :4] == 0).all()  # background is left undrawn
    assert (prediction[:, 4:] == torch.tensor(palette(2)[1], dtype=torch.uint8)).all()


def test_detection_grid_is_written_at_the_expected_size(tmp_path):
    images = torch.randn(2, 3, 40, 40)
    targets = [box_target([[4, 4, 20, 20]], [1], size=40), box_target([], [], size=40)]
    targets[1]["boxes"] = targets[1]["boxes"].reshape(0, 4)
    preds = [
        {
            "boxes": torch.tensor([[5.0, 5, 21, 19], [1, 1, 3, 3]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.1]),
            "masks": torch.rand(2, 1, 40, 40),
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 40, 40),
        },
    ]
    path = save_detection_grid(
        tmp_path / "det.png",
        images,
        preds,
        targets,
        mean=[0.5] * 3,
        std=[0.2] * 3,
        class_names=["background", "a", "b"],
    )
    scale = DRAW_MIN_SIDE // 40
    assert Image.open(path).size == (2 * (40 * scale + 2) + 2, 2 * (40 * scale + 2) + 2)
    path = save_detection_grid(
        tmp_path / "p.png", images, preds, mean=[0.5] * 3, std=[0.2] * 3, class_names=["background", "a", "b"], scale=1
    )
    assert Image.open(path).size == (40 + 4, 2 * (40 + 2) + 2)


def test_to_uint8_undoes_the_normalisation():
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    out = to_uint8((pixels - 0.25) / 0.5, [0.25], [0.5])
    assert out.shape == (1, 3, 1, 3) and out[0, :, 0].tolist() == [[0, 128, 255]] * 3
