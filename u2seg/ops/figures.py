"""Pictures: masks drawn over images, contact sheets, confusion heat maps, IoU bars, colour
segment maps; arrays in, PNG bytes or arrays out.

The charts are drawn by matplotlib's Agg canvas on a private `Figure` (never pyplot), so
no global state is touched and report workers may draw in threads or processes at once.
The per-image helpers (`overlay`, `contact_sheet`, `side_by_side`, `color_segments`,
`blend`) need only numpy and PIL.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw
from scipy import ndimage

from u2seg.ops.metrics import normalise_mapping


def palette(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3) distinct, saturated colours (golden-ratio hues)."""
    hues = (seed * 0.137 + np.arange(n) * 0.618034) % 1.0
    hsv = np.stack([hues * 255, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)
    rgb = Image.fromarray(hsv[None], mode="HSV").convert("RGB")
    return np.asarray(rgb)[0]


def overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image with each bool (H, W) mask filled in its colour and outlined."""
    out = image.astype(np.float32)
    colours = palette(len(masks)).astype(np.float32)
    for mask, colour in zip(masks, colours, strict=True):
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def contact_sheet(images: list[np.ndarray], cell: int = 256, columns: int = 4) -> np.ndarray:
    """uint8 grid of `images`, each fitted into a `cell` x `cell` square on white."""
    rows = -(-len(images) // columns)
    sheet = np.full((rows * cell, columns * cell, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        pil = Image.fromarray(image)
        pil.thumbnail((cell - 4, cell - 4))
        r, c = divmod(k, columns)
        y, x = r * cell + (cell - pil.height) // 2, c * cell + (cell - pil.width) // 2
        sheet[y : y + pil.height, x : x + pil.width] = np.asarray(pil)
    return sheet


MAX_NAME = 18


TITLE_STRIP = 20


GAP = 4


UNKNOWN_COLOUR = (128, 128, 128)


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _check_image(image: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")


def confusion_rows(counts: np.ndarray, mapping: Mapping[int, int], max_rows: int = 40) -> list[int]:
    """Row indices of (R, C) `counts` to draw, at most `max_rows`, top to bottom.

    Mapped rows (keys of `mapping`) first, ordered by the class they map to so the picture
    is near-diagonal; then the unmapped rows with the most pixels (empty rows never). When
    more than `max_rows` rows are mapped, the ones with the most pixels are kept.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    table = normalise_mapping(mapping)
    rows, cols = counts.shape
    for k, v in table.items():
        if not (0 <= k < rows and 0 <= v < cols):
            raise ValueError(f"mapping {k} -> {v} is outside counts of shape {counts.shape}")
    totals = counts.sum(axis=1)
    # Stable sorts on -totals keep ties in index order, so the selection is deterministic.
    mapped = sorted(table, key=lambda k: (-totals[k], k))[:max_rows]
    mapped.sort(key=lambda k: (table[k], k))
    rest = [int(k) for k in np.argsort(-totals, kind="stable") if k not in table and totals[k]]
    return mapped + rest[: max_rows - len(mapped)]


def confusion_figure(
    counts: np.ndarray,
    row_names: Sequence[str],
    col_names: Sequence[str],
    mapping: Mapping[int, int],
    title: str,
) -> bytes:
    """PNG of (R, C) int pixel counts (row = predicted cluster, column = GT class) as each
    GT class's share of pixels per cluster, matched cells outlined; at most 40 rows."""
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"counts must be a non-empty 2-D matrix, got shape {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"counts must hold non-negative integers, got dtype {counts.dtype}")
    if (len(row_names), len(col_names)) != counts.shape:
        raise ValueError(
            f"{len(row_names)} row names and {len(col_names)} column names do not fit counts "
            f"of shape {counts.shape}"
        )
    shown = confusion_rows(counts, mapping)
    totals = counts.sum(axis=0)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)[shown]
    num_rows, num_cols = share.shape
    fig = Figure(figsize=(min(14, 3 + 0.25 * num_cols), min(12, 2 + 0.25 * num_rows)), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax).set_label("share of the GT class's pixels")
    table = normalise_mapping(mapping)
    for y, row in enumerate(shown):
        if row in table:
            cell = Rectangle((table[row] - 0.5, y - 0.5), 1, 1, fill=False, ec="red", lw=1)
            ax.add_patch(cell)
    step = 2 if num_cols > 40 else 1
    ax.set_xticks(range(0, num_cols, step))
    ax.set_xticklabels([_short(col_names[c]) for c in range(0, num_cols, step)], rotation=90)
    ax.set_yticks(range(num_rows))
    ax.set_yticklabels([_short(row_names[r]) for r in shown])
    ax.tick_params(labelsize=6)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel(f"predicted cluster ({num_rows} of {counts.shape[0]} shown)")
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def iou_bars(names: Sequence[str], iou: Sequence[float], title: str) -> bytes:
    """PNG of per-class IoU (N values in %, NaN = class absent) as bars, best first.

    With every entry NaN the chart is drawn empty with a note, so a report still renders.
    """
    values = np.asarray(iou, dtype=np.float64)
    if values.ndim != 1 or len(names) != len(values):
        raise ValueError(f"{len(names)} names do not fit IoU values of shape {values.shape}")
    present = ~np.isnan(values)
    if ((values[present] < 0) | (values[present] > 100)).any():
        raise ValueError("IoU values must be percentages in [0, 100]")
    order = [int(i) for i in np.argsort(-values, kind="stable") if present[i]]
    fig = Figure(figsize=(7, min(30, 1.5 + 0.22 * len(order))), dpi=100)
    ax = fig.add_subplot()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title)
    if order:
        ax.barh(range(len(order)), values[order], color="tab:blue")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([_short(names[i]) for i in order], fontsize=6)
        ax.invert_yaxis()
        mean = float(values[order].mean())
        ax.axvline(mean, color="black", ls="--", lw=1, label=f"mIoU {mean:.1f}")
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.set_yticks([])
        ax.text(50, 0.5, "no class present in the ground truth", ha="center", va="center")
    fig.tight_layout()
    return _png(fig)


def side_by_side(
    panels: Sequence[np.ndarray], titles: Sequence[str], height: int = 256
) -> np.ndarray:
    """uint8 (TITLE_STRIP + height, sum of resized widths + 4 px gaps, 3): uint8 (H, W, 3)
    panels scaled to `height`, left to right on white, each titled above."""
    if len(panels) != len(titles) or not panels:
        raise ValueError(f"need as many titles as panels (>= 1), got {len(titles)}, {len(panels)}")
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    resized = []
    for k, panel in enumerate(panels):
        _check_image(panel, f"panel {k}")
        if panel.dtype != np.uint8 or 0 in panel.shape:
            raise ValueError(f"panel {k} must be a non-empty uint8 image, got {panel.dtype}")
        width = max(1, round(panel.shape[1] * height / panel.shape[0]))
        resized.append(Image.fromarray(panel).resize((width, height), Image.Resampling.BILINEAR))
    total = sum(p.width for p in resized) + GAP * (len(resized) - 1)
    canvas = Image.new("RGB", (total, TITLE_STRIP + height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for pil, title in zip(resized, titles, strict=True):
        canvas.paste(pil, (x, TITLE_STRIP))
        # Titles wider than their panel are cut so they do not run over the next one.
        while title and draw.textlength(title) > pil.width - 4:
            title = title[:-1]
        draw.text((x + 2, 4), title, fill="black")
        x += pil.width + GAP
    return np.asarray(canvas)


def color_segments(segments: np.ndarray, categories: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) picture of int (H, W) segment ids, 0 = void in black.

    Without `categories` every id has its own colour. With them (int (S,), categories[id]
    = class or -1 for unknown, drawn grey) the colour follows the class, and segment
    boundaries are white so touching instances of one class stay apart.
    """
    if segments.ndim != 2 or not np.issubdtype(segments.dtype, np.integer):
        raise ValueError(
            f"segments must be an int (H, W) map, got {segments.dtype} {segments.shape}"
        )
    if segments.size and segments.min() < 0:
        raise ValueError(f"segment ids must be >= 0, got min {segments.min()}")
    top = int(segments.max()) if segments.size else 0
    if categories is None:
        # palette(n)[i] does not depend on n, so ids keep their colour across images.
        colours = palette(top + 1)
    else:
        if categories.ndim != 1 or not np.issubdtype(categories.dtype, np.integer):
            raise ValueError(f"categories must be an int (S,) array, got shape {categories.shape}")
        if len(categories) <= top:
            raise ValueError(
                f"segment id {top} has no entry in categories of length {len(categories)}"
            )
        if categories.min() < -1:
            raise ValueError(f"categories must be >= -1, got min {categories.min()}")
        colours = palette(max(int(categories.max()), 0) + 1)[categories]
        colours[categories < 0] = UNKNOWN_COLOUR
    out = colours[segments]
    out[segments == 0] = 0
    if categories is not None:
        # A pixel whose 3x3 neighbourhood holds another id lies on a boundary.
        edge = ndimage.maximum_filter(segments, 3) != ndimage.minimum_filter(segments, 3)
        out[edge & (segments != 0)] = 255
    return out


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """uint8 (H, W, 3) mix of photo and colour picture (both (H, W, 3)); where `colors`
    is black (void) the photo is only dimmed by (1 - alpha)."""
    _check_image(image, "image")
    if colors.shape != image.shape:
        raise ValueError(f"colors has shape {colors.shape} but image has shape {image.shape}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return out.clip(0, 255).round().astype(np.uint8)
