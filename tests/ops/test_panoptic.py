"""Panoptic merge (docs/method.md stage 5) and its COCO encoders on hand-made masks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from u2seg.data.coco import (
    detectron2_metadata,
    id_to_rgb,
    image_info,
    instances_dataset,
    instances_from_panoptic,
    panoptic_annotation,
    panoptic_categories,
    panoptic_dataset,
    panoptic_file_name,
    rgb_to_id,
    rle_to_mask,
)
from u2seg.ops.panoptic import (
    PanopticResult,
    background_masks,
    border_share,
    box_areas,
    combine_predictions,
    has_things,
    merge_panoptic,
    paint_instances,
    segment_boxes,
    semantic_map,
)

K, S = 5, 3  # thing classes 1..5, stuff clusters 0..2 -> categories 6..8


def box(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) mask of the half-open rectangle rows x cols."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def info_by_id(result: PanopticResult) -> dict[int, dict[str, Any]]:
    return {info["id"]: info for info in result.segments_info}


def reference_merge(
    masks: list[np.ndarray],
    classes: list[int],
    stuff: np.ndarray,
    num_things: int,
    num_stuff: int,
    overlap: float,
    void: int,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """docs/method.md stage 5 written as plainly as possible, one full-image mask at a time:
    (H, W) segment ids and [(id, category_id)]."""
    areas = []
    for m in masks:
        ys, xs = np.nonzero(m)
        areas.append((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) if ys.size else 0)
    order = sorted(range(len(masks)), key=lambda i: areas[i], reverse=True)
    owner = np.full(stuff.shape, -1)
    for i in order:
        owner[masks[i]] = i
    segments = np.zeros(stuff.shape, dtype=np.int64)
    cats = []
    for i in order:
        if (owner == i).any():
            cats.append((len(cats) + 1, classes[i]))
            segments[owner == i] = len(cats)
    for c in range(num_stuff):
        region = (stuff == c) & (stuff != void)
        free = region & (owner < 0)
        if not free.any() or (region & (owner >= 0)).sum() / region.sum() > overlap:
            continue
        cats.append((len(cats) + 1, num_things + 1 + c))
        segments[free] = len(cats)
    return segments, cats


def test_smaller_instance_wins_the_overlap_larger_keeps_the_rest() -> None:
    shape = (10, 12)
    large = box(shape, (0, 6), (0, 8))  # bbox area 48
    small = box(shape, (3, 8), (5, 10))  # bbox area 25, overlaps large in rows 3-5, cols 5-7
    stuff = np.zeros(shape, dtype=np.int64)
    # Input order small first: the painting order comes from the areas, not the input.
    result = merge_panoptic([small, large], [2, 4], stuff, K, S)
    assert result.instance_index == (1, 0)  # large is painted first: segment 1
    assert result.dropped == ()
    assert np.array_equal(result.segments == 2, small)
    assert np.array_equal(result.segments == 1, large & ~small)
    info = info_by_id(result)
    assert info[1]["category_id"] == 4 and info[1]["isthing"] == 1
    assert info[2]["category_id"] == 2 and info[2]["isthing"] == 1
    assert info[1]["area"] == 48 - 9 and info[2]["area"] == 25
    assert info[1]["bbox"] == [0, 0, 8, 6] and info[2]["bbox"] == [5, 3, 5, 5]


def test_painting_order_is_bbox_area_not_pixel_area() -> None:
    shape = (12, 12)
    frame = box(shape, (0, 12), (0, 12)) & ~box(shape, (1, 11), (1, 11))  # 44 px, bbox 144
    block = box(shape, (0, 8), (0, 8))  # 64 px, bbox 64: more pixels, smaller box
    painting = paint_instances([block, frame])
    assert painting.order == (1, 0)
    assert np.array_equal(painting.index_map == 0, block)  # block is on top of the frame
    # Given areas override the mask boxes; equal areas keep the input order (later on top).
    assert paint_instances([block, frame], areas=[10.0, 10.0]).order == (0, 1)
    assert paint_instances([block, frame], areas=[200.0, 10.0]).order == (0, 1)


def test_min_visible_drops_a_group_left_as_fragments_and_gives_its_pixels_below() -> None:
    shape = (20, 20)
    scene = box(shape, (0, 20), (0, 20))  # bbox 400: under everything
    group = box(shape, (2, 12), (2, 18))  # 160 px holding its two members
    left, right = box(shape, (2, 12), (2, 9)), box(shape, (2, 12), (11, 18))  # 70 px each
    masks = [scene, group, left, right]
    # docs/method.md's merge keeps the group as the 20 px strip between its members.
    plain = paint_instances(masks)
    assert plain.order == (0, 1, 2, 3) and np.count_nonzero(plain.index_map == 1) == 20
    painting = paint_instances(masks, min_visible=0.5)
    assert painting.order == (0, 2, 3) and painting.dropped == (1,)
    # The strip between the members goes to the scene below the group, not to void.
    assert np.all(painting.index_map[group & ~left & ~right] == 0)
    assert np.array_equal(painting.index_map == 2, left)
    # Exactly min_visible is kept: the group with 20 of 160 px visible at 0.125.
    assert paint_instances(masks, min_visible=0.125).order == (0, 1, 2, 3)
    assert paint_instances(masks, min_visible=0.126).dropped == (1,)
    # Decided from the top down: a dropped instance does not hide the ones under it. The
    # scene keeps 400 - 140 = 260 px (0.65) once the group is gone, 240 (0.6) with it.
    assert paint_instances(masks, min_visible=0.62).order == (0, 2, 3)
    result = merge_panoptic(masks, [1, 2, 3, 3], np.zeros(shape, dtype=np.int64), K, S,
                            min_visible=0.5)  # fmt: skip
    assert result.dropped == (1,) and result.instance_index == (0, 2, 3)
    assert [info["category_id"] for info in result.segments_info] == [1, 3, 3]
    with pytest.raises(ValueError, match="min_visible"):
        paint_instances(masks, min_visible=1.5)


def test_instance_covered_by_smaller_ones_and_empty_instance_are_dropped() -> None:
    shape = (10, 10)
    background = box(shape, (0, 10), (0, 10))
    middle = box(shape, (2, 6), (2, 6))  # bbox 16
    top = box(shape, (2, 4), (2, 6))  # bbox 8
    bottom = box(shape, (4, 6), (2, 6))  # bbox 8
    empty = np.zeros(shape, dtype=bool)
    masks = [background, middle, top, empty, bottom]
    painting = paint_instances(masks)
    assert painting.dropped == (1, 3)
    assert painting.order == (0, 2, 4)
    result = merge_panoptic(masks, [1, 2, 3, 4, 5], np.zeros(shape, dtype=np.int64), K, S)
    assert result.dropped == (1, 3)
    assert result.instance_index == (0, 2, 4)
    assert [info["category_id"] for info in result.segments_info] == [1, 3, 5]
    assert set(np.unique(result.segments)) == {1, 2, 3}  # all things: stuff is covered


@pytest.mark.parametrize("scale", [1, 3, 7, 10, 13, 100])
def test_stuff_overlap_exactly_at_threshold_is_kept_above_is_skipped(scale: int) -> None:
    # Cluster 0 owns rows 0-9, cluster 1 rows 10-19, each 10 x (10 * scale) pixels; thing A
    # covers exactly 70 % of cluster 0, thing B 70 % plus one pixel of cluster 1.
    width = 10 * scale
    shape = (20, width)
    stuff = np.zeros(shape, dtype=np.int64)
    stuff[10:] = 1
    a = box(shape, (0, 10), (0, 7 * scale))
    b = box(shape, (10, 20), (0, 7 * scale))
    b[10, 7 * scale] = True
    result = merge_panoptic([a, b], [1, 2], stuff, K, S, stuff_overlap=0.7)
    assert result.skipped_stuff == (1,)
    info = info_by_id(result)
    stuff_segments = [i for i in info.values() if not i["isthing"]]
    assert len(stuff_segments) == 1
    kept = stuff_segments[0]
    assert kept["category_id"] == K + 1 + 0
    assert np.array_equal(result.segments == kept["id"], (stuff == 0) & ~a)
    assert kept["area"] == 30 * scale
    # The skipped cluster's free pixels are void in the panoptic map and 255 in the semantic.
    free_of_1 = (stuff == 1) & ~b
    assert (result.segments[free_of_1] == 0).all()
    assert (semantic_map(result)[free_of_1] == 255).all()


def test_empty_instance_list_gives_stuff_only_result() -> None:
    shape = (6, 9)
    stuff = np.full(shape, 255, dtype=np.uint8)
    stuff[:, :3] = 2
    stuff[:, 3:6] = 0
    result = merge_panoptic([], [], stuff, K, S)
    assert not has_things(result)
    assert result.instance_index == () and result.dropped == () and result.skipped_stuff == ()
    # Stuff segments come in increasing cluster order; absent cluster 1 makes none.
    assert [(i["id"], i["category_id"], i["isthing"]) for i in result.segments_info] == [
        (1, K + 1, 0),
        (2, K + 3, 0),
    ]
    assert (result.segments[:, 6:] == 0).all()
    sem = semantic_map(result)
    assert sem.dtype == np.uint8
    assert (sem[:, :3] == 3).all() and (sem[:, 3:6] == 1).all() and (sem[:, 6:] == 255).all()
    only_empty = merge_panoptic([np.zeros(shape, dtype=bool)], [1], stuff, K, S)
    assert not has_things(only_empty) and only_empty.dropped == (0,)


def test_void_value_is_a_parameter() -> None:
    stuff = np.array([[0, 0, -1], [1, 1, -1]])
    result = merge_panoptic([], [], stuff, K, S, void=-1)
    assert result.segments.tolist() == [[1, 1, 0], [2, 2, 0]]
    with pytest.raises(ValueError, match="0..2 or void"):
        merge_panoptic([], [], stuff, K, S)  # -1 is not the default void 255
    with pytest.raises(ValueError, match="collides"):
        merge_panoptic([], [], stuff, K, S, void=1)


def test_random_scenes_match_a_plain_reference_and_coco_areas_boxes() -> None:
    rng = np.random.default_rng(0)
    shape = (48, 64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(20):
        masks = []
        for _ in range(rng.integers(0, 7)):
            cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            ry, rx = rng.integers(1, 20, size=2)
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        classes = [int(c) for c in rng.integers(1, K + 1, size=len(masks))]
        stuff = rng.integers(0, S, size=(6, 8)).repeat(8, axis=0).repeat(8, axis=1)
        stuff[rng.random(shape) < 0.05] = 255
        overlap = float(rng.choice([0.3, 0.7, 0.9]))
        result = merge_panoptic(masks, classes, stuff, K, S, stuff_overlap=overlap)
        segments, cats = reference_merge(masks, classes, stuff, K, S, overlap, 255)
        assert np.array_equal(result.segments, segments)
        assert [(i["id"], i["category_id"]) for i in result.segments_info] == cats
        for info in result.segments_info:
            mask = result.segments == info["id"]
            rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
            assert info["area"] == int(mask_utils.area(rle)) == mask.sum()
            assert info["bbox"] == [int(v) for v in mask_utils.toBbox(rle)]
            assert info["isthing"] == int(info["category_id"] <= K)
            assert info["iscrowd"] == 0
        sem = semantic_map(result)
        things = np.isin(result.segments, [i["id"] for i in result.segments_info if i["isthing"]])
        assert (sem[things] == 0).all()
        assert (sem[result.segments == 0] == 255).all()
        stuff_px = ~things & (result.segments > 0)
        assert np.array_equal(sem[stuff_px], stuff[stuff_px] + 1)


def test_box_helpers() -> None:
    shape = (7, 9)
    masks = [box(shape, (1, 4), (2, 7)), np.zeros(shape, dtype=bool)]
    assert box_areas(masks).tolist() == [15, 0]
    segments = np.zeros(shape, dtype=np.int32)
    segments[2:5, 1:3] = 2
    segments[6, 8] = 3
    boxes = segment_boxes(segments, 4)
    assert boxes.tolist() == [[0, 0, 9, 7], [0, 0, 0, 0], [1, 2, 2, 3], [8, 6, 1, 1], [0, 0, 0, 0]]


def test_categories_things_then_stuff() -> None:
    cats = panoptic_categories(K, S)
    assert [c["id"] for c in cats] == list(range(1, K + S + 1))
    assert [c["isthing"] for c in cats] == [1] * K + [0] * S
    assert cats[0]["name"] == "thing-1" and cats[K]["name"] == "stuff-0"
    assert all(set(c) == {"id", "name", "supercategory", "isthing", "color"} for c in cats)
    assert len({tuple(c["color"]) for c in cats[K:]}) == S
    named = panoptic_categories(2, 1, ["cat", "dog"], ["sky"])
    assert [c["name"] for c in named] == ["cat", "dog", "sky"]
    with pytest.raises(ValueError):
        panoptic_categories(2, 1, ["cat"], ["sky"])


def test_panoptic_png_id_round_trip() -> None:
    assert id_to_rgb(np.array([[1, 256, 65536]])).tolist() == [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]
    ids = np.array([[0, 1, 2, 255], [256, 70_000, 1_234_567, 256**3 - 1]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buffer, format="PNG")
    buffer.seek(0)
    back = rgb_to_id(np.asarray(Image.open(buffer)))
    assert back.dtype == np.int32
    assert np.array_equal(back, ids)
    with pytest.raises(ValueError):
        id_to_rgb(np.array([[256**3]]))


def test_panoptic_file_name_replaces_the_extension() -> None:
    assert panoptic_file_name("000000000139.jpg") == "000000000139.png"
    assert panoptic_file_name("a/b.c/photo.JPEG") == "a/b.c/photo.png"


def scene() -> tuple[list[np.ndarray], list[int], np.ndarray]:
    shape = (16, 20)
    stuff = np.zeros(shape, dtype=np.int64)
    stuff[8:] = 2
    masks = [box(shape, (2, 12), (2, 14)), box(shape, (6, 10), (10, 18))]
    return masks, [3, 5], stuff


def test_instances_json_loads_in_pycocotools(tmp_path: Path) -> None:
    masks, classes, stuff = scene()
    result = merge_panoptic(masks, classes, stuff, K, S)
    visible = instances_from_panoptic(result, image_id=7, first_annotation_id=100)
    whole = instances_from_panoptic(result, 7, 100, instance_masks=masks)
    cats = panoptic_categories(K, S)
    images = [image_info(7, "photo.jpg", height=16, width=20)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances_dataset(images, visible, cats)))
    coco = COCO(str(path))
    assert coco.getCatIds() == list(range(1, K + 1))  # things only
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[7]))
    assert [a["id"] for a in anns] == [100, 101]
    assert [a["category_id"] for a in anns] == [3, 5]  # large (class 3) is painted first
    for ann, info in zip(anns, result.segments_info[:2], strict=True):
        assert np.array_equal(coco.annToMask(ann).astype(bool), result.segments == info["id"])
        assert ann["area"] == info["area"]
    # Whole masks: the large instance keeps the part the small one paints over.
    assert np.array_equal(rle_to_mask(whole[0]["segmentation"]), masks[0])
    assert np.array_equal(rle_to_mask(whole[1]["segmentation"]), masks[1])


def test_panoptic_json_has_standard_keys_and_survives_json() -> None:
    masks, classes, stuff = scene()
    result = merge_panoptic(masks, classes, stuff, K, S)
    annotation = panoptic_annotation(7, panoptic_file_name("photo.jpg"), result.segments_info)
    images = [image_info(7, "photo.jpg", height=16, width=20)]
    dataset = panoptic_dataset(images, [annotation], panoptic_categories(K, S))
    assert {"images", "annotations", "categories"} <= set(dataset)
    assert json.loads(json.dumps(dataset)) == dataset  # plain Python types only
    ann = dataset["annotations"][0]
    assert ann["image_id"] == 7 and ann["file_name"] == "photo.png"
    assert [s["id"] for s in ann["segments_info"]] == [1, 2, 3, 4]
    assert [s["category_id"] for s in ann["segments_info"]] == [3, 5, K + 1, K + 3]
    cat_ids = {c["id"] for c in dataset["categories"]}
    assert all(s["category_id"] in cat_ids for s in ann["segments_info"])
    # The segment areas add up to the non-void pixels of the PNG the stage writes.
    assert sum(s["area"] for s in ann["segments_info"]) == (result.segments > 0).sum()


def test_semantic_map_matches_detectron2_separated_conversion() -> None:
    # detectron2's prepare_panoptic_fpn.py: things -> 0, stuff -> 1.. in category order,
    # void -> 255. Apply that rule to the panoptic JSON and compare.
    masks, classes, stuff = scene()
    result = merge_panoptic(masks, classes, stuff, K, S)
    cats = panoptic_categories(K, S)
    id_map = {c["id"]: 0 for c in cats if c["isthing"]}
    id_map |= {c["id"]: i + 1 for i, c in enumerate(c for c in cats if not c["isthing"])}
    expected = np.full(result.segments.shape, 255, dtype=np.uint8)
    for info in result.segments_info:
        expected[result.segments == info["id"]] = id_map[info["category_id"]]
    assert np.array_equal(semantic_map(result), expected)


def test_detectron2_metadata_maps_categories_back_and_forth() -> None:
    cats = panoptic_categories(K, S)
    meta = detectron2_metadata(K, S, cats)
    assert meta["thing_classes"] == [c["name"] for c in cats[:K]]
    assert meta["thing_dataset_id_to_contiguous_id"] == {k: k - 1 for k in range(1, K + 1)}
    assert meta["stuff_classes"][0] == "things" and len(meta["stuff_classes"]) == S + 1
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    assert stuff_map == {0: 0, K + 1: 1, K + 2: 2, K + 3: 3}
    # Semantic value of stuff cluster c (c + 1) is its contiguous id.
    assert all(stuff_map[K + 1 + c] == c + 1 for c in range(S))


def test_bad_inputs_are_errors_that_say_what() -> None:
    shape = (4, 4)
    stuff = np.zeros(shape, dtype=np.int64)
    mask = box(shape, (0, 2), (0, 2))
    with pytest.raises(ValueError, match="thing classes"):
        merge_panoptic([mask], [K + 1], stuff, K, S)
    with pytest.raises(ValueError, match="classes"):
        merge_panoptic([mask], [], stuff, K, S)
    with pytest.raises(ValueError, match="shape"):
        merge_panoptic([np.zeros((3, 4), dtype=bool)], [1], stuff, K, S)
    with pytest.raises(ValueError, match="0..2 or void"):
        merge_panoptic([], [], np.full(shape, 3), K, S)
    with pytest.raises(ValueError, match="num_stuff"):
        merge_panoptic([], [], stuff, K, 255)
    with pytest.raises(ValueError, match="stuff_overlap"):
        merge_panoptic([], [], stuff, K, S, stuff_overlap=1.5)
    with pytest.raises(ValueError, match="shape"):
        paint_instances([])


def test_model_outputs_merge_by_score_with_overlap_and_stuff_area_rules() -> None:
    shape = (100, 100)
    big = np.zeros(shape, dtype=bool)
    big[:50, :50] = True
    inside = np.zeros(shape, dtype=bool)
    inside[10:40, 10:40] = True  # entirely under `big`: 100 % overlap once big is placed
    half = np.zeros(shape, dtype=bool)
    half[:50, 30:80] = True  # 20 of its 50 columns under `big`: 40 %, keeps its free part
    weak = np.zeros(shape, dtype=bool)
    weak[80:, 80:] = True
    semantic = np.zeros(shape, dtype=np.int64)
    semantic[50:, :] = 1  # stuff class 1: 5000 px free
    semantic[:50, 80:] = 2  # stuff class 2: 1000 px, below 4096
    result = combine_predictions(
        [inside, big, half, weak], [0.8, 0.9, 0.7, 0.3], [1, 2, 3, 1], semantic, num_things=3
    )
    assert result.instance_index == (1, 2)  # big first (score), inside dropped, weak < 0.5
    assert result.dropped == (0, 3)
    assert result.skipped_stuff == (1,)  # class 2 = cluster 1, too small
    info = {s["id"]: s for s in result.segments_info}
    assert [info[k]["category_id"] for k in (1, 2, 3)] == [2, 3, 3 + 1]
    assert info[2]["area"] == 50 * 30  # half's free pixels only
    assert info[3]["area"] == 50 * 100 and not info[3]["isthing"]
    assert (result.segments[:50, 80:] == 0).all()  # skipped stuff stays void
    assert semantic_map(result)[60, 10] == 1 and semantic_map(result)[5, 5] == 0


def test_background_masks_are_those_along_the_frame_except_the_first() -> None:
    close_up = np.ones((40, 40), dtype=bool)  # a cat's face filling the frame: the first mask
    sky = np.zeros((40, 40), dtype=bool)
    sky[:10] = True  # the top row and 9 rows down both sides: 58 of the 156 border pixels
    person = np.zeros((40, 40), dtype=bool)
    person[20:, 15:25] = True  # cut by the bottom edge: 10 + 0 border pixels
    cup = np.zeros((40, 40), dtype=bool)
    cup[12:20, 12:20] = True
    assert border_share(close_up) == 1.0 and border_share(cup) == 0.0
    assert border_share(sky) == pytest.approx(58 / 156)
    assert border_share(person) == pytest.approx(10 / 156)
    masks = [close_up, sky, person, cup, close_up]
    assert background_masks(masks, 0.15).tolist() == [False, True, False, False, True]
    assert background_masks(masks, 0.0).tolist() == [False] * 5  # off: docs/method.md's merge
    assert background_masks(masks, 0.5).tolist() == [False, False, False, False, True]
    assert background_masks([], 0.15).tolist() == []


def test_background_masks_hide_what_they_cover_then_go_to_stuff() -> None:
    cup = np.zeros((20, 20), dtype=bool)
    cup[14:18, 4:8] = True
    sky = np.zeros((20, 20), dtype=bool)
    sky[:10] = True
    cloud = np.zeros((20, 20), dtype=bool)
    cloud[2:5, 2:5] = True  # a fragment ranked below the sky, inside it
    stuff = np.zeros((20, 20), dtype=np.int64)
    options = {"areas": np.arange(3.0), "min_visible": 0.5}  # best first, best on top
    plain = merge_panoptic([cup, sky, cloud], [1, 2, 3], stuff, 3, 1, **options)
    assert [s["category_id"] for s in plain.segments_info if s["isthing"]] == [2, 1]
    result = merge_panoptic(
        [cup, sky, cloud], [1, 2, 3], stuff, 3, 1, **options, background=[False, True, False]
    )
    # The sky still hid the cloud under it, then gave its pixels to the stuff map.
    assert [(s["category_id"], s["isthing"]) for s in result.segments_info] == [(1, 1), (4, 0)]
    assert result.instance_index == (0,) and result.dropped == (1, 2)
    assert np.array_equal(result.segments == 1, cup)
    assert np.array_equal(result.segments == 2, ~cup)
    with pytest.raises(ValueError, match="3 masks but 2 background flags"):
        merge_panoptic([cup, sky, cloud], [1, 2, 3], stuff, 3, 1, background=[False, True])
