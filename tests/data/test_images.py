from __future__ import annotations

import io
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from tests.helpers import save_photo, write_bad_files
from u2seg.data.images import (
    ImageError,
    SourceError,
    SquareImages,
    decode_image,
    list_images,
    read_image,
    resize_square,
)

MAX_PIXELS = 1_000_000


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    save_photo(root / "b.jpg", (40, 30), seed=1)
    save_photo(root / "sub" / "a.png", (20, 50), seed=2)
    save_photo(root / "sub" / "deeper" / "c.JPEG", (33, 33), seed=3)
    (root / "notes.txt").write_text("not listed: wrong extension")
    return root


def test_folder_is_recursive_sorted_and_relative(folder: Path) -> None:
    refs = list_images(str(folder)).to_pylist()
    assert [r["file_name"] for r in refs] == ["b.jpg", "sub/a.png", "sub/deeper/c.JPEG"]
    assert [r["image_id"] for r in refs] == [1, 2, 3]
    assert all(Path(r["path"]).is_file() for r in refs)


def test_coco_json_uses_its_ids_and_root(folder: Path, tmp_path: Path) -> None:
    coco = {
        "images": [
            {"id": 17, "file_name": "sub/a.png", "width": 20, "height": 50},
            {"id": 4, "file_name": "b.jpg", "width": 40, "height": 30},
        ]
    }
    path = tmp_path / "ann" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    refs = list_images(str(path), root=str(folder)).to_pylist()
    assert [(r["image_id"], r["file_name"]) for r in refs] == [(17, "sub/a.png"), (4, "b.jpg")]
    assert refs[0]["path"] == f"{folder}/sub/a.png"
    # Without a root, file names resolve next to the JSON.
    assert list_images(str(path)).to_pylist()[1]["path"] == f"{path.parent}/b.jpg"


def test_relative_local_paths_become_absolute(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray Train workers run in a folder of their own: a path relative to where the driver
    # started would not be found there.
    path = tmp_path / "ann" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "b.jpg"}]}))
    (path.parent / "b.jpg").write_bytes((folder / "b.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    relative_root = os.path.relpath(folder, tmp_path)
    refs = [list_images("ann/instances.json"), list_images("ann/instances.json", relative_root)]
    monkeypatch.chdir(folder / "sub")
    assert [r.column("path")[0].as_py() for r in refs] == [str(path.parent / "b.jpg"),
                                                          str(folder / "b.jpg")]  # fmt: skip
    assert all(Path(r.column("path")[0].as_py()).is_file() for r in refs)


def test_text_list_relative_absolute_and_comments(folder: Path) -> None:
    listing = folder / "list.txt"
    listing.write_text(f"# images\nb.jpg\n\n{folder}/sub/a.png\n")
    refs = list_images(str(listing)).to_pylist()
    assert [r["path"] for r in refs] == [f"{folder}/b.jpg", f"{folder}/sub/a.png"]
    assert [r["image_id"] for r in refs] == [1, 2]


def test_fsspec_url_source() -> None:
    fs = fsspec.filesystem("memory")
    for name, fmt in (("x/1.png", "PNG"), ("x/y/2.jpg", "JPEG")):
        with fs.open(f"/bucket/{name}", "wb") as fh:
            Image.new("RGB", (8, 6), (10, 20, 30)).save(fh, format=fmt)
    refs = list_images("memory://bucket").to_pylist()
    assert [r["file_name"] for r in refs] == ["x/1.png", "x/y/2.jpg"]
    # fsspec's canonical URL of the memory filesystem has a rooted path (memory:///...).
    assert refs[0]["path"].startswith("memory://") and refs[0]["path"].endswith("/bucket/x/1.png")
    assert read_image(refs[0]["path"], MAX_PIXELS).shape == (6, 8, 3)


@pytest.mark.parametrize(
    ("source", "message"),
    [("", "no image source"), ("/no/such/dir", "not found")],
)
def test_bad_sources(source: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        list_images(source)


def test_empty_folder_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images"):
        list_images(str(tmp_path))
    bad = tmp_path / "x.json"
    bad.write_text('{"annotations": []}')
    with pytest.raises(SourceError, match="'images' list"):
        list_images(str(bad))
    other = tmp_path / "x.csv"
    other.write_text("a")
    with pytest.raises(SourceError, match="expected a folder"):
        list_images(str(other))


def test_each_bad_file_has_its_reason(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(ImageError, match=reason):
            read_image(str(tmp_path / name), MAX_PIXELS)
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(str(tmp_path / "missing.jpg"), MAX_PIXELS)


def test_decode_rgb_from_gray_and_rgba() -> None:
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (5, 4)).save(buf, format="PNG")
        assert decode_image(buf.getvalue(), MAX_PIXELS).shape == (4, 5, 3)


def test_square_images_keeps_good_rows_and_records_bad(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    save_photo(tmp_path / "good.jpg", (64, 48), seed=5)
    names = ["good.jpg", *expected]
    batch = {
        "image_id": np.arange(1, len(names) + 1),
        "file_name": np.array(names, dtype=object),
        "path": np.array([str(tmp_path / n) for n in names], dtype=object),
    }
    out = SquareImages(size=28, max_pixels=MAX_PIXELS)(batch)
    assert out["image"].shape == (len(names), 28, 28, 3)
    assert out["error"][0] == "" and (out["width"][0], out["height"][0]) == (64, 48)
    assert out["image"][0].any()
    for i, name in enumerate(names[1:], start=1):
        assert out["error"][i].startswith(expected[name]), (name, out["error"][i])
        assert not out["image"][i].any() and out["width"][i] == 0


def test_resize_square_ignores_aspect() -> None:
    image = np.zeros((30, 70, 3), dtype=np.uint8)
    assert resize_square(image, 14).shape == (14, 14, 3)


def test_text_list_strips_before_honouring_comments(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        "   # an indented comment\n"
        f"  {folder / 'a.jpg'}  # a note after the path\n"
        "\n"
        f"{folder / 'sub' / 'b.png'}\t\n"
    )
    refs = list_images(str(listing)).to_pylist()
    assert [r["path"] for r in refs] == [str(folder / "a.jpg"), str(folder / "sub" / "b.png")]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], r"image ids \[1\]"),
        ([{"file_name": "a.jpg"}], r"images\[0\] needs an 'id'"),
        ({"1": {"id": 1, "file_name": "a.jpg"}}, "'images' must be a list, got dict"),
    ],
)
def test_coco_image_lists_that_cannot_be_used_are_named(
    tmp_path: Path, images: object, message: str
) -> None:
    source = tmp_path / "instances.json"
    source.write_text(json.dumps({"images": images}))
    with pytest.raises(SourceError, match=message):
        list_images(str(source))


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path: Path) -> None:
    ramp = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = read_image(str(path), 10_000_000)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.std() > 50  # not a white frame


@pytest.mark.parametrize(("top", "full"), [(235, 255), (3500, 4095), (1023, 1023)])
def test_grey_data_of_fewer_bits_in_a_16_bit_file_keeps_its_contrast(
    tmp_path: Path, top: int, full: int
) -> None:
    # 8-bit nuclei in a 16-bit TIFF (as the 2018 Data Science Bowl's), a 12-bit camera: the
    # range is the smallest sample depth that holds the largest value, not 16 bits.
    ramp = np.linspace(0, top, 48 * 64).round().reshape(48, 64).astype(np.uint16)
    path = tmp_path / "cells.tif"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = read_image(str(path), 10_000_000)
    expected = np.round(ramp.astype(np.int64) * 255 / full).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 1], expected)
    assert rgb.max() >= round(top * 255 / full) > 200


def test_listed_names_stay_under_the_root(folder: Path, tmp_path: Path) -> None:
    # Output names (label PNGs) come from file names: a name that leaves the image root is
    # recorded with its reason and no path; an absolute name under the root becomes relative.
    source = tmp_path / "instances.json"
    names = [str(folder / "a.jpg"), "sub/b.png", "../../../photo.jpg", "sub/../../x.jpg",
             "/etc/passwd.jpg", "http://example.com/x.jpg", "..\\evil.jpg"]  # fmt: skip
    images = [{"id": k, "file_name": n} for k, n in enumerate(names, 1)]
    source.write_text(json.dumps({"images": images}))
    refs = list_images(str(source), str(folder)).to_pylist()
    assert [(r["file_name"], r["path"]) for r in refs[:2]] == [
        ("a.jpg", f"{folder}/a.jpg"),
        ("sub/b.png", f"{folder}/sub/b.png"),
    ]
    assert [r["error"] for r in refs[:2]] == ["", ""]
    for r in refs[2:]:
        assert r["path"] == "" and r["file_name"] in names
    assert all("'..'" in r["error"] for r in (refs[2], refs[3], refs[6]))
    assert all(r["error"].startswith("outside data.root") for r in refs[4:6])
    # The root itself may be the store a URL names.
    assert list_images(str(source), "http://example.com").to_pylist()[5]["error"] == ""


def test_a_coco_listing_never_holds_the_annotations(tmp_path: Path) -> None:
    # 30 MB of annotations around 10 images: the listing's memory does not grow with them.
    import tracemalloc

    polygon = [float(v) for v in range(2000)]
    anns = [{"id": k, "image_id": 1, "segmentation": [polygon]} for k in range(1500)]
    images = [{"id": k, "file_name": f"{k}.jpg"} for k in range(1, 11)]
    source = tmp_path / "instances.json"
    source.write_text(json.dumps({"annotations": anns, "images": images, "more": anns}))
    assert source.stat().st_size > 20e6
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"images": images}))
    list_images(str(small))  # the first table built sets up pyarrow (~26 MB, once)
    tracemalloc.start()
    refs = list_images(str(source))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert refs.column("image_id").to_pylist() == list(range(1, 11))
    assert peak < 5e6, f"{peak / 1e6:.0f} MB held to list 10 images"
