"""Evaluation cores (docs/method.md stage 7) on hand-made label maps, boxes and segments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from u2seg.ops.metrics import (
    ConfusionMatrix,
    PQStats,
    apply_mapping,
    box_iou,
    gt_matches,
    hungarian_match,
    majority_match,
    majority_vote_mapping,
    normalise_mapping,
    pq_stats,
    pq_summary,
    semantic_scores,
)

# ------------------------------------------------------------------------- semantic


def _random_labels(seed: int, shape: tuple[int, int] = (16, 20), num: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num, size=shape)


def test_perfect_prediction_scores_100() -> None:
    gt = _random_labels(0)
    cm = ConfusionMatrix(5, 5).update(gt, gt)
    scores = semantic_scores(cm, hungarian_match(cm))
    assert scores["mIoU"] == pytest.approx(100.0)
    assert scores["pixel_accuracy"] == pytest.approx(100.0)
    assert scores["per_class_iou"] == pytest.approx([100.0] * 5)


def test_permuted_labels_score_100_after_hungarian() -> None:
    gt = _random_labels(1)
    perm = np.array([3, 0, 4, 1, 2])
    cm = ConfusionMatrix(5, 5).update(perm[gt], gt)
    mapping = hungarian_match(cm)
    assert mapping == {int(perm[c]): c for c in range(5)}
    scores = semantic_scores(cm, mapping)
    assert scores["mIoU"] == pytest.approx(100.0)
    assert scores["pixel_accuracy"] == pytest.approx(100.0)
    assert (apply_mapping(perm[gt], mapping) == gt).all()


def _split_class_case() -> ConfusionMatrix:
    # 10 pixels of class 0 (6 in cluster 0, 4 in cluster 2), 10 of class 1 (cluster 1).
    gt = np.array([[0] * 10 + [1] * 10])
    pred = np.array([[0] * 6 + [2] * 4 + [1] * 10])
    return ConfusionMatrix(3, 2).update(pred, gt)


def test_more_clusters_than_classes_one_to_one_vs_majority() -> None:
    cm = _split_class_case()
    one_to_one = hungarian_match(cm)
    assert one_to_one == {0: 0, 1: 1}  # cluster 2 is left unmatched
    scores = semantic_scores(cm, one_to_one)
    # Cluster 2's 4 pixels are wrong: accuracy 16/20; IoU class 0 = 6/10, class 1 = 1.
    assert scores["pixel_accuracy"] == pytest.approx(80.0)
    assert scores["per_class_iou"] == pytest.approx([60.0, 100.0])
    assert scores["mIoU"] == pytest.approx(80.0)

    many_to_one = majority_match(cm)
    assert many_to_one == {0: 0, 1: 1, 2: 0}
    scores = semantic_scores(cm, many_to_one)
    assert scores["pixel_accuracy"] == pytest.approx(100.0)
    assert scores["mIoU"] == pytest.approx(100.0)
    assert apply_mapping(np.array([0, 1, 2]), one_to_one).tolist() == [0, 1, 255]


def test_unmatched_cluster_pixels_are_wrong_and_not_false_positives_of_others() -> None:
    # A fourth cluster that no class takes: its pixels are FN of their GT class only.
    cm = np.array([[5, 0], [0, 5], [3, 1]])
    scores = semantic_scores(cm, {0: 0, 1: 1})
    assert scores["pixel_accuracy"] == pytest.approx(100 * 10 / 14)
    assert scores["per_class_iou"] == pytest.approx([100 * 5 / 8, 100 * 5 / 6])


def test_void_pixels_are_ignored() -> None:
    gt = np.array([[0, 0, 1, 1, 255, 255]])
    pred = np.array([[0, 0, 1, 1, 0, 1]])
    cm = ConfusionMatrix(2, 2).update(pred, gt)
    assert cm.counts.sum() == 4
    assert semantic_scores(cm, hungarian_match(cm))["mIoU"] == pytest.approx(100.0)
    # Another ignore value is honoured, and 255 is then an out-of-range class.
    cm = ConfusionMatrix(2, 2).update(pred, np.where(gt == 255, -1, gt), ignore=-1)
    assert cm.counts.sum() == 4


def test_miou_averages_only_classes_present_in_ground_truth() -> None:
    gt = np.array([[0, 0, 2, 2]])
    cm = ConfusionMatrix(3, 3).update(gt, gt)
    scores = semantic_scores(cm, {0: 0, 1: 1, 2: 2})
    assert scores["mIoU"] == pytest.approx(100.0)
    per_class = scores["per_class_iou"]
    assert isinstance(per_class, list) and np.isnan(per_class[1])


def test_confusion_matrices_merge_like_one_stream() -> None:
    gts = [_random_labels(s, num=4) for s in (2, 3)]
    preds = [_random_labels(s + 10, num=6) for s in (2, 3)]
    per_image = [ConfusionMatrix(6, 4).update(p, g) for p, g in zip(preds, gts, strict=True)]
    whole = ConfusionMatrix(6, 4).update(np.concatenate(preds), np.concatenate(gts))
    summed = per_image[0] + per_image[1]
    assert (summed.counts == whole.counts).all()
    assert per_image[0].counts.sum() == gts[0].size  # `+` left its operands alone
    assert (per_image[0].merge(per_image[1]).counts == whole.counts).all()
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5, 4\)"):
        whole.merge(ConfusionMatrix(5, 4))


def test_mapping_fit_on_one_split_scores_another_after_json_round_trip() -> None:
    perm = np.array([2, 0, 1, 3])  # cluster 3 is never a GT class's cluster
    gt_a, gt_b = _random_labels(4, num=3), _random_labels(5, num=3)
    fit = ConfusionMatrix(4, 3).update(perm[gt_a], gt_a)
    loaded = json.loads(json.dumps(hungarian_match(fit)))
    assert all(isinstance(k, str) for k in loaded)

    pred_b = perm[gt_b]
    pred_b[0, 0] = 3  # a cluster unmatched on split A is wrong on split B
    held_out = ConfusionMatrix(4, 3).update(pred_b, gt_b)
    scores = semantic_scores(held_out, loaded)
    assert scores["pixel_accuracy"] == pytest.approx(100 * (gt_b.size - 1) / gt_b.size)

    mapped = apply_mapping(pred_b, loaded)
    assert mapped[0, 0] == 255 and (mapped.ravel()[1:] == gt_b.ravel()[1:]).all()
    # The lost pixel is an FN of its GT class only: IoU (n - 1) / n there, 100 elsewhere.
    lost = int(gt_b[0, 0])
    n = int((gt_b == lost).sum())
    expected = [100.0 * (n - 1) / n if c == lost else 100.0 for c in range(3)]
    assert scores["per_class_iou"] == pytest.approx(expected)


def test_semantic_bad_input() -> None:
    cm = ConfusionMatrix(3, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="pred ids"):
        cm.update(np.array([[-1, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="pred ids"):
        cm.update(np.array([[3, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="gt"):
        cm.update(np.array([[0, 0]]), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="gt"):
        cm.update(np.array([[0, 0]]), np.array([[0, -3]]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([[0.5, 0]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="outside"):
        semantic_scores(cm, {0: 5})
    with pytest.raises(ValueError, match="non-negative"):
        apply_mapping(np.array([-2]), {0: 0})
    with pytest.raises(ValueError, match="at least one"):
        ConfusionMatrix(0, 3)
    assert cm.counts.sum() == 0  # failed updates add nothing


# ------------------------------------------------------------------------- instance


def test_box_iou_matches_hand_values_and_pycocotools() -> None:
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 10, 10], [0, 0, 7, 10], [20, 20, 1, 1]])
    assert box_iou(a, b) == pytest.approx(np.array([[50 / 150, 0.7, 0.0]]))
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 50, (2, 2, 8))
    w, h = rng.uniform(1, 30, (2, 2, 8))
    boxes = np.stack([x, y, w, h], axis=-1)
    ref = mask_utils.iou(boxes[0], boxes[1], [0] * 8)
    assert box_iou(boxes[0], boxes[1]) == pytest.approx(ref)


def test_majority_vote_thresholds() -> None:
    votes = [
        (7, 1, 0.59, 0.95),  # score below 0.6: no vote
        (7, 2, 0.60, 0.71),  # score exactly 0.6 votes
        (8, 1, 0.99, 0.70),  # IoU exactly 0.7 does not vote (strictly greater)
        (9, 3, 0.9, 0.9),
        (9, 3, 0.9, 0.9),
        (9, 4, 0.9, 0.9),
        (10, 5, 0.9, 0.9),  # tie between classes 4 and 5 goes to 4
        (10, 4, 0.9, 0.9),
    ]
    assert majority_vote_mapping(votes) == {7: 2, 9: 3, 10: 4}  # 8 is dropped
    mapping = majority_vote_mapping(votes)
    assert normalise_mapping(json.loads(json.dumps(mapping))) == mapping
    assert normalise_mapping({"1": 2, "3": -1, "4": None}) == {1: 2}
    # Thresholds are parameters.
    assert majority_vote_mapping(votes, min_score=0.5, min_iou=0.5)[8] == 1


def test_votes_from_boxes_end_to_end() -> None:
    gt_boxes = np.array([[0, 0, 10, 10], [50, 50, 10, 10]])
    gt_classes = np.array([1, 2])
    pred_boxes = np.array(
        [[0, 0, 10, 10], [0, 0, 7, 10], [50, 50, 10, 9], [50, 50, 10, 10], [90, 90, 5, 5]]
    )
    pred_classes = np.array([30, 31, 32, 33, 34])
    pred_scores = np.array([0.9, 0.9, 0.9, 0.59, 0.9])
    preds = (pred_boxes, pred_classes, pred_scores)
    matches = list(gt_matches(gt_boxes, gt_classes, *preds, rule="best"))
    assert [m[:2] for m in matches] == [(30, 1), (31, 1), (32, 2), (33, 2), (34, 1)]
    assert matches[1][3] == pytest.approx(0.7)
    # 31 (IoU 0.7), 33 (score 0.59) and 34 (no overlap) are dropped.
    assert majority_vote_mapping(matches) == {30: 1, 32: 2}
    assert list(gt_matches(np.zeros((0, 4)), [], *preds, rule="best")) == []
    with pytest.raises(ValueError, match=r"\(2,\)"):
        list(gt_matches(gt_boxes, [1], *preds, rule="best"))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        list(gt_matches(gt_boxes, gt_classes, pred_boxes, pred_classes, pred_scores[:2]))


def test_u2segs_vote_counts_every_overlapping_box_crowd_included() -> None:
    # Cluster 7 has two predictions: one overlaps a person box (IoU 0.95) and a crowd box
    # of class 2 (IoU 0.99), the other only a second crowd box of class 2 (IoU 1.0).
    gt_boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.6], [40, 40, 10, 10]])
    gt_classes = np.array([1, 2, 2])
    crowd = np.array([False, True, True])
    preds = (np.array([[0, 0, 10, 9.5], [40, 40, 10, 10]]), np.array([7, 7]), np.full(2, 0.9))
    # U2Seg's do_hangarain_mapping: every box with IoU > 0.7 votes, crowd included: 2 -> 1.
    every = list(gt_matches(gt_boxes, gt_classes, *preds, rule="every", min_iou=0.7))
    assert sorted(m[:2] for m in every) == [(7, 1), (7, 2), (7, 2)]
    assert majority_vote_mapping(every) == {7: 2}
    # The best non-crowd box only: one vote for person, the second prediction none.
    best = list(gt_matches(gt_boxes[~crowd], gt_classes[~crowd], *preds, rule="best"))
    assert majority_vote_mapping(best) == {7: 1}
    with pytest.raises(ValueError, match="vote rule"):
        list(gt_matches(gt_boxes, gt_classes, *preds, rule="all"))


# ------------------------------------------------------------------------- panoptic

THING, STUFF, OTHER = 1, 2, 3


def _summary(stats: PQStats) -> dict[str, dict[str, float]]:
    return pq_summary(stats, thing_ids=[THING, OTHER], stuff_ids=[STUFF])


def test_perfect_panoptic_prediction_scores_100() -> None:
    seg = np.array([[1, 1, 2, 2], [1, 1, 3, 3], [4, 4, 4, 0]])
    gt_info = {1: (THING, 0), 2: (THING, 0), 3: (OTHER, 0), 4: (STUFF, 0)}
    pred_info = {k: v[0] for k, v in gt_info.items()}
    # Predicted ids need not equal GT ids.
    result = _summary(
        pq_stats(seg + 10 * (seg > 0), {k + 10: v for k, v in pred_info.items()}, seg, gt_info)
    )
    for group, n in (("All", 3), ("Things", 2), ("Stuff", 1)):
        assert result[group] == pytest.approx({"PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "n": n})


def test_split_segment_pq_by_hand() -> None:
    # One GT thing of 20 pixels, predicted as two segments of 12 and 8 pixels.
    # IoU(12-pixel part) = 12/20 = 0.6 > 0.5: TP with IoU 0.6; the 8-pixel part
    # (IoU 0.4) is an FP; nothing is FN. PQ = 0.6 / (1 + 0.5*1 + 0.5*0) = 0.4,
    # SQ = 0.6 / 1 = 0.6, RQ = 1 / 1.5 = 2/3.
    gt = np.ones((2, 10), dtype=np.int64)
    pred = np.where(np.arange(10) < 6, 1, 2)[None].repeat(2, axis=0)
    stats = pq_stats(pred, {1: THING, 2: THING}, gt, {1: (THING, 0)})
    assert stats.per_category[THING] == pytest.approx([1, 1, 0, 0.6])
    things = _summary(stats)["Things"]
    assert things == pytest.approx({"PQ": 40.0, "SQ": 60.0, "RQ": 100 * 2 / 3, "n": 1})

    # An even 10/10 split has IoU 0.5 each, not > 0.5: 0 TP, 2 FP, 1 FN, PQ 0.
    pred = np.where(np.arange(10) < 5, 1, 2)[None].repeat(2, axis=0)
    stats = pq_stats(pred, {1: THING, 2: THING}, gt, {1: (THING, 0)})
    assert stats.per_category[THING] == pytest.approx([0, 2, 1, 0.0])
    assert _summary(stats)["All"]["PQ"] == 0.0


def test_void_pixels_leave_the_union_and_void_predictions_are_not_fp() -> None:
    # GT: thing on columns 0-7 (16 px), void on 8-9 (4 px). One prediction covers all
    # 20 px: union = 20 + 16 - 16 - 4 void = 16, IoU 1.
    gt = np.where(np.arange(10) < 8, 1, 0)[None].repeat(2, axis=0)
    pred = np.ones_like(gt)
    stats = pq_stats(pred, {1: THING}, gt, {1: (THING, 0)})
    assert stats.per_category[THING] == pytest.approx([1, 0, 0, 1.0])

    # A prediction lying mostly (3 of 4 px) on void is not an FP; half (2 of 4) is.
    gt = np.array([[1, 1, 1, 1, 0, 0, 0, 2]])
    gt_info = {1: (THING, 0), 2: (STUFF, 0)}
    pred = np.array([[1, 1, 1, 1, 5, 5, 5, 5]])
    stats = pq_stats(pred, {1: THING, 5: OTHER}, gt, gt_info)
    assert OTHER not in stats.per_category
    pred = np.array([[1, 1, 1, 1, 1, 5, 5, 5]])
    gt = np.array([[1, 1, 1, 1, 0, 0, 2, 2]])
    stats = pq_stats(pred, {1: THING, 5: OTHER}, gt, gt_info)
    assert stats.per_category[OTHER] == pytest.approx([0, 1, 0, 0.0])
    assert stats.per_category[STUFF] == pytest.approx([0, 0, 1, 0.0])


def test_crowd_regions() -> None:
    # GT: a crowd of THING on columns 0-4, a plain THING on columns 5-9.
    gt = np.where(np.arange(10) < 5, 1, 2)[None].repeat(2, axis=0)
    gt_info = {1: (THING, 1), 2: (THING, 0)}
    # A THING prediction exactly on the crowd is neither TP nor FP, and an unmatched
    # crowd is no FN: PQ 100 from the plain segment alone.
    stats = pq_stats(gt, {1: THING, 2: THING}, gt, gt_info)
    assert stats.per_category[THING] == pytest.approx([1, 0, 0, 1.0])
    # A prediction of another category on the crowd is an FP of that category.
    stats = pq_stats(gt, {1: OTHER, 2: THING}, gt, gt_info)
    assert stats.per_category[OTHER] == pytest.approx([0, 1, 0, 0.0])
    # A crowd is never matched, however well it is covered; a missed plain GT is an FN.
    pred = np.ones_like(gt)
    # IoU with the plain segment is 10/20 = 0.5 (no match): an FN; the prediction lies
    # half (not more) on the crowd, so it is also an FP.
    stats = pq_stats(pred, {1: THING}, gt, gt_info)
    assert stats.per_category[THING] == pytest.approx([0, 1, 1, 0.0])
    # Covering the crowd plus 4 of the 10 plain pixels: 10/14 on crowd, so no FP.
    pred = np.where(np.arange(10) < 9, 1, 2)[None].repeat(2, axis=0)
    pred[:, 7:9] = 3
    stats = pq_stats(pred, {1: THING, 2: STUFF, 3: STUFF}, gt, gt_info)
    assert stats.per_category[THING] == pytest.approx([0, 0, 1, 0.0])


def test_pq_stats_accumulate_over_images() -> None:
    gt = np.ones((2, 10), dtype=np.int64)
    split = np.where(np.arange(10) < 6, 1, 2)[None].repeat(2, axis=0)
    first = pq_stats(split, {1: THING, 2: THING}, gt, {1: (THING, 0)})
    second = pq_stats(gt, {1: STUFF}, gt, {1: (STUFF, 0)})
    total = first + second
    assert total.per_category[THING] == pytest.approx([1, 1, 0, 0.6])
    assert total.per_category[STUFF] == pytest.approx([1, 0, 0, 1.0])
    assert STUFF not in first.per_category  # `+` left its operands alone
    result = _summary(total)
    assert result["All"]["PQ"] == pytest.approx((40.0 + 100.0) / 2)
    assert result["All"]["n"] == 2


def test_pq_summary_edge_cases() -> None:
    empty = pq_summary(PQStats(), thing_ids=[1], stuff_ids=[2])
    assert empty["All"] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "n": 0}
    stats = PQStats({9: [1, 0, 0, 1.0]})
    with pytest.raises(ValueError, match=r"neither thing nor stuff: \[9\]"):
        pq_summary(stats, thing_ids=[1], stuff_ids=[2])
    with pytest.raises(ValueError, match="both thing and stuff"):
        pq_summary(stats, thing_ids=[1, 9], stuff_ids=[9])


def test_pq_bad_input() -> None:
    seg = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        pq_stats(seg, {1: THING}, np.ones((3, 2), dtype=np.int64), {1: (THING, 0)})
    with pytest.raises(ValueError, match="pred_segments ids"):
        pq_stats(-seg, {-1: THING}, seg, {1: (THING, 0)})
    with pytest.raises(ValueError, match=r"pred \[1\]"):
        pq_stats(seg, {}, seg, {1: (THING, 0)})
    with pytest.raises(ValueError, match=r"gt \[1\]"):
        pq_stats(seg, {1: THING}, seg, {})


# Cross-check against torchmetrics' PanopticQuality where it follows COCO: it has no
# crowd notion, and it also forgives a GT segment lying mostly on *predicted* void
# (panopticapi counts that FN), so predictions here cover every pixel.


def _random_panoptic(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """(H, W) ids: two stuff regions, random thing boxes on top, some void; id -> category."""
    h, w = shape
    seg = np.where(np.arange(w) < rng.integers(2, w - 2), 1, 2)[None].repeat(h, axis=0)
    info = {1: 10, 2: 11}  # stuff categories
    for k in range(rng.integers(1, 5)):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        seg[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = 3 + k
        info[3 + k] = int(rng.integers(1, 3))  # thing categories 1, 2
    info = {k: v for k, v in info.items() if (seg == k).any()}
    return seg, info


def test_pq_matches_torchmetrics_without_crowd() -> None:
    import torch
    from torchmetrics import detection

    rng = np.random.default_rng(0)
    things, stuff = {1, 2}, {10, 11}
    metric = detection.PanopticQuality(things=things, stuffs=stuff, return_sq_and_rq=True)
    total = PQStats()
    for _ in range(12):
        gt, gt_cat = _random_panoptic(rng, (12, 14))
        gt[rng.random(gt.shape) < 0.05] = 0  # void sprinkled over GT
        pred = gt.copy()
        pred[rng.random(gt.shape) < 0.15] = 1  # noise onto a stuff segment
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=1)
        pred[pred == 0] = 2
        pred_cat = {k: v for k, v in gt_cat.items() if (pred == k).any()}
        pred_cat.update({k: 10 + k - 1 for k in (1, 2) if (pred == k).any()})
        if rng.random() < 0.3:  # a wrong-category thing now and then
            thing_ids = [k for k in pred_cat if k >= 3]
            if thing_ids:
                pred_cat[thing_ids[0]] = 3 - pred_cat[thing_ids[0]]
        total.merge(pq_stats(pred, pred_cat, gt, {k: (v, 0) for k, v in gt_cat.items()}))

        def encode(seg: np.ndarray, cat: dict[int, int], void: int) -> np.ndarray:
            cats = np.vectorize(lambda i: cat.get(int(i), void))(seg)
            return np.stack([cats, seg], axis=-1)[None]

        metric.update(
            torch.from_numpy(encode(pred, pred_cat, -1)), torch.from_numpy(encode(gt, gt_cat, 99))
        )
    ours = pq_summary(total, thing_ids=things, stuff_ids=stuff)["All"]
    pq, sq, rq = (100 * float(v) for v in metric.compute())
    assert 0 < ours["PQ"] < 100  # the case exercises TP, FP and FN alike
    assert (ours["PQ"], ours["SQ"], ours["RQ"]) == pytest.approx((pq, sq, rq))


def test_miou_averages_every_class_a_prediction_can_claim() -> None:
    # 3 clusters x 3 classes; class 2 is absent from the ground truth, but cluster 2 (mapped
    # to it by Hungarian) holds 10 pixels of class 0.
    counts = np.array([[50, 0, 0], [0, 40, 0], [10, 0, 0]])
    mapping = hungarian_match(counts)
    assert mapping == {0: 0, 1: 1, 2: 2}
    stego = semantic_scores(counts, mapping)  # STEGO / mmseg: class 2 counts, IoU 0
    assert stego["mIoU"] == pytest.approx(100 * (50 / 60 + 1 + 0) / 3)  # 61.11
    assert stego["mIoU"] == pytest.approx(61.11, abs=0.01)
    present = semantic_scores(counts, mapping, rule="present")
    assert present["mIoU"] == pytest.approx(91.67, abs=0.01)
    assert stego["per_class_iou"][2] == 0.0
    # A class neither in the ground truth nor claimed stays undefined (NaN) and unaveraged.
    unclaimed = semantic_scores(np.array([[50, 0, 0], [0, 40, 0]]), {0: 0, 1: 1})
    assert np.isnan(unclaimed["per_class_iou"][2]) and unclaimed["mIoU"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="mIoU rule"):
        semantic_scores(counts, mapping, rule="everything")
