"""Dense metrics against hand-computed cases: COCO AP (pycocotools), mIoU / mAcc / aAcc, slide inference."""

from __future__ import annotations

import math

import pytest
import torch

from transnext.dense.inference import segment_image, slide_windows
from transnext.dense.metrics import SegmentationMetric, coco_evaluate, detections_to_coco

pytest.importorskip("pycocotools", reason="pycocotools is not installed (extra: dense)")


def _gt() -> dict:
    """One 100x100 image: two cats (small boxes) and one dog (a medium box); category ids 3 and 7."""
    def ann(i, cat, box):
        x, y, w, h = box
        return dict(id=i, image_id=1, category_id=cat, bbox=box, area=w * h, iscrowd=0,
                    segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])

    return dict(
        images=[dict(id=1, file_name="a.png", width=100, height=100)],
        annotations=[ann(1, 3, [10, 10, 20, 20]), ann(2, 3, [60, 10, 25, 25]), ann(3, 7, [20, 50, 50, 40])],
        categories=[dict(id=3, name="cat"), dict(id=7, name="dog")],
    )


def _det(cat, box, score):
    return dict(image_id=1, category_id=cat, bbox=box, score=score)


def test_perfect_detection_gives_ap_100() -> None:
    gt = _gt()
    res = [_det(a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    out = coco_evaluate(gt, res, iou_types=("bbox",))["bbox"]
    assert out["AP"] == pytest.approx(100) and out["AP50"] == pytest.approx(100) and out["AP75"] == pytest.approx(100)
    assert out["APs"] == pytest.approx(100) and out["APm"] == pytest.approx(100)
    assert out["APl"] == -1.0  # no large objects: COCO reports -1
    assert out["per_class"] == {"cat": pytest.approx(100), "dog": pytest.approx(100)}


def test_one_missed_object_gives_the_hand_computed_ap() -> None:
    # Cats: 1 of 2 found -> recall 0.5 at precision 1: 51 of COCO's 101 recall points -> 51/101.
    gt = _gt()
    res = [_det(3, [10, 10, 20, 20], 0.9), _det(7, [20, 50, 50, 40], 0.8)]
    out = coco_evaluate(gt, res, iou_types=("bbox",))["bbox"]
    cat_ap = 100 * 51 / 101
    assert out["per_class"]["cat"] == pytest.approx(cat_ap)
    assert out["per_class"]["dog"] == pytest.approx(100)
    assert out["AP"] == pytest.approx((cat_ap + 100) / 2)


def test_higher_scored_false_positive_halves_ap() -> None:
    # Dog: a false positive ranked above the true detection -> precision 1/2 at every recall.
    gt = _gt()
    res = [_det(3, [10, 10, 20, 20], 0.9), _det(3, [60, 10, 25, 25], 0.9),
           _det(7, [0, 0, 10, 10], 0.95), _det(7, [20, 50, 50, 40], 0.5)]
    out = coco_evaluate(gt, res, iou_types=("bbox",))["bbox"]
    assert out["per_class"]["dog"] == pytest.approx(50)
    assert out["per_class"]["cat"] == pytest.approx(100)


def test_masks_from_detector_outputs_and_segm_ap() -> None:
    gt = _gt()
    masks = torch.zeros(3, 1, 100, 100)
    boxes = []
    for k, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        masks[k, 0, y:y + h, x:x + w] = 0.9
        boxes.append([x, y, x + w, y + h])
    outputs = [dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([1, 1, 2]),
                    scores=torch.tensor([0.9, 0.8, 0.7]), masks=masks)]
    res = detections_to_coco(outputs, [1], {1: 3, 2: 7})
    assert [r["category_id"] for r in res] == [3, 3, 7] and res[0]["bbox"] == [10, 10, 20, 20]
    out = coco_evaluate(gt, res)
    assert out["bbox"]["AP"] == pytest.approx(100) and out["segm"]["AP"] == pytest.approx(100)
    # Mask probabilities under the threshold give empty masks: segm AP 0, boxes unaffected.
    outputs[0]["masks"] = masks * 0.5
    out = coco_evaluate(gt, detections_to_coco(outputs, [1], {1: 3, 2: 7}))
    assert out["bbox"]["AP"] == pytest.approx(100) and out["segm"]["AP"] == pytest.approx(0)


def test_no_detections_gives_zero_not_an_error() -> None:
    out = coco_evaluate(_gt(), [])
    assert out["bbox"]["AP"] == 0.0 and out["segm"]["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_segmentation_metric_hand_computed() -> None:
    label = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    m = SegmentationMetric(3)
    m.update(pred, label)
    r = m.compute(classes=["a", "b", "c"])
    # IoU: a 1/2, b 2/3, c 1; Acc: a 1/2, b 1, c 1; 4 of 5 labelled pixels right.
    assert r["mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)
    assert r["mAcc"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert r["aAcc"] == pytest.approx(80)
    assert r["per_class"]["b"] == {"IoU": pytest.approx(200 / 3), "Acc": pytest.approx(100)}
    # Perfect prediction; a class absent from labels and predictions is left out of the means.
    m = SegmentationMetric(4)
    m.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 2]]))
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100) and r["mAcc"] == pytest.approx(100) and r["aAcc"] == pytest.approx(100)
    assert math.isnan(r["per_class"]["3"]["IoU"])
    # Accumulation over images sums areas before dividing (not a mean of per-image IoUs).
    m = SegmentationMetric(2)
    m.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # class 1 missed
    m.update(torch.tensor([1]), torch.tensor([1]))
    r = m.compute()
    assert r["per_class"]["0"]["IoU"] == pytest.approx(75) and r["per_class"]["1"]["IoU"] == pytest.approx(50)
    with pytest.raises(ValueError, match="labels outside 0..1"):
        m.update(torch.tensor([0]), torch.tensor([5]))


def test_slide_windows_follow_the_reference_grid() -> None:
    assert slide_windows(700, 512, 512, 341) == [(0, 512, 0, 512), (188, 700, 0, 512)]
    assert slide_windows(300, 300, 512, 341) == [(0, 300, 0, 300)]  # smaller than a crop: one window
    assert len(slide_windows(512, 2048, 512, 341)) == 6


def test_slide_and_flip_equal_whole_for_a_pointwise_model() -> None:
    conv = torch.nn.Conv2d(3, 4, 1)
    conv.num_classes = 4
    x = torch.randn(1, 3, 40, 70)
    whole = segment_image(conv, x, mode="whole")
    torch.testing.assert_close(segment_image(conv, x, mode="slide", crop=32, stride=21), whole)
    aug = segment_image(conv, x, mode="slide", crop=32, stride=21, flip=True)
    torch.testing.assert_close(aug, whole.softmax(1))
    ms = segment_image(conv, x, scales=(0.5, 1.0), flip=True, out_size=(20, 35))
    assert ms.shape == (1, 4, 20, 35) and torch.allclose(ms.sum(1), torch.ones(1, 20, 35))


def test_mask_ap_uses_mask_areas_not_box_areas() -> None:
    import numpy as np
    from pycocotools import mask as mu

    def rle(y, x, s):
        m = np.zeros((100, 100), np.uint8)
        m[y:y + s, x:x + s] = 1
        r = mu.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        return r

    gt = dict(images=[dict(id=1, file_name="a.png", width=100, height=100)],
              annotations=[dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 10, 10], area=100, iscrowd=0, segmentation=rle(10, 10, 10))],
              categories=[dict(id=1, name="x")])
    # a higher-scored false positive with a small mask but a large box: it is a small object
    res = [dict(image_id=1, category_id=1, bbox=[0, 0, 100, 100], score=0.9, segmentation=rle(60, 60, 8)),
           dict(image_id=1, category_id=1, bbox=[10, 10, 10, 10], score=0.5, segmentation=rle(10, 10, 10))]
    segm = coco_evaluate(gt, res, iou_types=("segm",))["segm"]
    assert segm["APs"] == pytest.approx(50) and segm["AP"] == pytest.approx(50)


def test_class_agnostic_ap_and_foreground_iou() -> None:
    from transnext.dense.metrics import class_agnostic, foreground_iou

    gt = _gt()
    # right boxes, wrong categories: AP 0 by class, 100 for localisation alone
    res = [_det(7 if a["category_id"] == 3 else 3, a["bbox"], 0.9) for a in gt["annotations"]]
    assert coco_evaluate(gt, res, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(0)
    assert coco_evaluate(*class_agnostic(gt, res), iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(100)
    # foreground = classes 1, 2 merged: 3 animal pixels labelled; 2 found (one with the wrong animal), 1 false alarm
    m = SegmentationMetric(3)
    m.update(torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 1, 2, 0]))
    assert foreground_iou(m.confusion) == pytest.approx(100 * 2 / 4)
