"""Image ingestion: list images from a folder, a COCO JSON or a text list, and decode them
on Ray Data.

Sources are local paths or fsspec URLs, so cluster jobs read shared storage. Only the list of
paths is held by the driver; pixels are read and decoded inside Ray tasks and stream through
the pipeline. A file that cannot be used (missing, empty, not an image, truncated, or more
pixels than `max_pixels`) becomes a row with an `error` reason instead of pixels: stages
record it in their error table and go on.

Output names (label PNGs) derive from file names, so a listed name must stay inside the
image root: a name with a `..` part, and an absolute path or URL outside `data.root`, is
listed with an `error` and no path (recorded and skipped like an unreadable image); an
absolute path or URL under `data.root` is listed by its name relative to it. A name listed
twice is an error the second time (outputs are keyed by file name).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import Counter
from typing import BinaryIO

import fsspec
import ijson
import numpy as np
import pyarrow as pa
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from u2seg.data.names import is_absolute, leaves_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
REF_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("path", pa.string()),
        ("error", pa.string()),  # why the listed name is refused; "" when it is not
    ]
)

# A comment after a path: "photo.jpg  # note" (a "#" inside a name is kept).
_COMMENT = re.compile(r"\s+#")


class SourceError(ValueError):
    """The image source itself (folder, JSON, list) cannot be read."""


class ImageError(ValueError):
    """One image cannot be used; the message is the reason stored in the error table."""


def listed_name(root: str, name: str) -> tuple[str, str, str]:
    """(file_name, path, error) of a listed name under `root` (see the module docstring)."""
    prefix = f"{root.rstrip('/')}/"
    if is_absolute(name):
        if not name.startswith(prefix):
            return name, "", f"outside data.root ({root}): set data.root to a folder holding it"
        name = name[len(prefix) :]
    if leaves_root(name):
        return name, "", "a file name with a '..' part (outputs are named after file names)"
    return name, f"{prefix}{name}", ""


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path else "."


def _refs(ids: list[int], names: list[str], root: str) -> pa.Table:
    listed = [listed_name(root, n) for n in names]
    first: dict[str, int] = {}
    for k, (name, _, error) in enumerate(listed):
        if not error and name in first:  # outputs are keyed by file name
            listed[k] = name, "", f"listed before, as image {ids[first[name]]}"
        first.setdefault(name, k)
    columns = dict(zip(("file_name", "path", "error"), zip(*listed, strict=True), strict=True))
    return pa.table({"image_id": ids, **columns}, schema=REF_SCHEMA)


def _list_folder(fs: fsspec.AbstractFileSystem, folder: str, local: bool) -> pa.Table:
    found = sorted(p for p in fs.find(folder) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise SourceError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    prefix = folder.rstrip("/") + "/"
    names = [p[len(prefix) :] for p in found]
    root = folder if local else fs.unstrip_protocol(folder)
    return _refs(list(range(1, len(names) + 1)), names, root)


def _list_coco(source: str, root: str) -> pa.Table:
    """The `images` of a COCO JSON, read one by one as the file streams past (ijson): its
    annotations, most of a COCO file, are never held."""
    ids, names = [], []
    with fsspec.open(source, "rb") as fh:
        try:
            for k, im in enumerate(ijson.items(fh, "images.item")):
                if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                    raise SourceError(
                        f"{source}: images[{k}] needs an 'id' and a 'file_name': {im!r}"
                    )
                ids.append(int(im["id"]))
                names.append(str(im["file_name"]))
        except ijson.JSONError as exc:
            raise SourceError(f"{source} is not a COCO JSON with an 'images' list: {exc}") from None
    if not ids:
        with fsspec.open(source, "rb") as fh:  # no image: say why (an empty list, or none)
            found = next(ijson.items(fh, "images"), None)
        if found is None:
            raise SourceError(f"{source} is not a COCO JSON with an 'images' list")
        if not isinstance(found, list):
            raise SourceError(f"{source}: 'images' must be a list, got {type(found).__name__}")
        raise SourceError(f"{source} lists no images")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        # pycocotools would merge the masks of the photos sharing an id.
        raise SourceError(f"{source}: image ids {repeated[:10]} are used by more than one image")
    return _refs(ids, names, root)


def _list_text(source: str, root: str) -> pa.Table:
    """One path per line; blank lines and `#` comments (whole-line or after whitespace)
    are skipped, surrounding whitespace is not part of a path."""
    names = []
    with fsspec.open(source, "rt") as fh:
        for line in fh:
            name = _COMMENT.split(line.strip(), maxsplit=1)[0].strip()
            if name and not name.startswith("#"):
                names.append(name)
    if not names:
        raise SourceError(f"{source} lists no images")
    return _refs(list(range(1, len(names) + 1)), names, root)


def list_images(source: str, root: str | None = None) -> pa.Table:
    """The images of `source` as a table (image_id, file_name, path), in a stable order.

    Folder: images found recursively, sorted by path, ids 1..N, file_name relative to it.
    COCO JSON (*.json): its `images` with their ids; paths are `root`/file_name.
    Text list (*.txt / *.lst): one path per line (# comments allowed), ids 1..N.
    `root` defaults to the folder holding the JSON or list.
    """
    if not source:
        raise SourceError("no image source given: set data.source=<folder | coco.json | list.txt>")
    fs, path = url_to_fs(source)
    if not fs.exists(path):
        raise SourceError(f"image source not found: {source}")
    if fs.isdir(path):
        return _list_folder(fs, path, local=isinstance(fs, LocalFileSystem))
    base = root if root is not None else _parent(source)
    if "://" not in base:
        # Local paths are made absolute: Ray Train workers run in a folder of their own.
        base = os.path.abspath(base)
    if source.lower().endswith(".json"):
        return _list_coco(source, base)
    if source.lower().endswith((".txt", ".lst")):
        return _list_text(source, base)
    raise SourceError(f"{source}: expected a folder, a COCO *.json or a *.txt list of paths")


def _open_image(fh: BinaryIO, max_pixels: int) -> Image.Image:
    """The image of `fh` with only its header read; `ImageError` for a non-image, a corrupt
    header and more than `max_pixels` pixels."""
    try:
        image = Image.open(fh)
    except UnidentifiedImageError:
        raise ImageError("not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels: {exc}") from None
    except OSError as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} > max_pixels={max_pixels}")
    return image


def image_size(path: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image, upright (EXIF orientation applied), from its header
    only; `ImageError` as `read_image` gives it for a file it cannot use."""
    try:
        with fsspec.open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_image(fh, max_pixels)
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read file: {exc}") from None
    # The orientations that turn the image a quarter (as ImageOps.exif_transpose does).
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of an encoded image, EXIF orientation applied.

    Raises `ImageError` for an empty file, a non-image, a truncated or corrupt image, and an
    image with more than `max_pixels` pixels (checked from the header, before decoding).
    """
    if not data:
        raise ImageError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open_image(io.BytesIO(data), max_pixels)
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"truncated or corrupt image: {exc}") from None
    if upright.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey
        return _grey_to_rgb8(np.asarray(upright), upright.mode)
    if upright.mode == "F":
        raise ImageError("32-bit float image: not a photo (convert it to 8 or 16 bits)")
    return np.asarray(upright.convert("RGB"))


#: Sample depths of grey images in 16-bit containers: 8-bit data (microscopy exports), the
#: 10 / 12 / 14-bit cameras, full 16 bits.
_GREY_BITS = (8, 10, 12, 14, 16)


def _grey_to_rgb8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """uint8 (H, W, 3) of a high-bit-depth grey image: the range of the smallest sample depth
    that holds its largest value (8, 10, 12, 14 or 16 bits) scaled to 8 bits. Pillow's own
    conversion clips it (a 16-bit photo comes out white), and scaling every image from 16
    bits would turn 8- or 12-bit data in a 16-bit file (as microscopes write) black."""
    values = pixels.astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ImageError(f"{mode} image with values outside 0..65535: not a photo")
    top = int(values.max(initial=0))
    full = next((1 << bits) - 1 for bits in _GREY_BITS if top < 1 << bits)
    grey = ((values * 255 + full // 2) // full).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def read_image(path: str, max_pixels: int) -> np.ndarray:
    """Read and decode one image from a local path or fsspec URL; `ImageError` if unusable."""
    try:
        with fsspec.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read file: {exc}") from None
    return decode_image(data, max_pixels)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8; aspect ratio not kept (MaskCut's input)."""
    pil = Image.fromarray(image).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(pil)


class SquareImages:
    """Ray Data batch function: reference rows -> square-resized pixels, or an error reason.

    Output columns: the input columns (image_id, file_name, path, ...) plus width, height
    (original size, 0 on error), image (size, size, 3) uint8 (zeros on error) and error
    ("" when fine).
    """

    def __init__(self, size: int, max_pixels: int) -> None:
        self.size = size
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        pixels = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        widths = np.zeros(n, dtype=np.int64)
        heights = np.zeros(n, dtype=np.int64)
        errors = np.full(n, "", dtype=object)
        for i, path in enumerate(batch["path"]):
            if "error" in batch and batch["error"][i]:
                errors[i] = str(batch["error"][i])  # refused by the listing
                continue
            try:
                image = read_image(str(path), self.max_pixels)
            except ImageError as exc:
                errors[i] = str(exc)
                continue
            heights[i], widths[i] = image.shape[:2]
            pixels[i] = resize_square(image, self.size)
        return {
            **batch,
            "width": widths,
            "height": heights,
            "image": pixels,
            "error": errors,
        }
