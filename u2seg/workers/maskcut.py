"""The `maskcut` stage's per-batch work: square images -> ViT -> MaskCut or the candidate
pool -> refinement -> COCO annotations, every step of a batch on the actor's device."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from u2seg.config import MaskCutConfig
from u2seg.data.coco import masks_to_rles, rle_to_annotation
from u2seg.models.vit import ViTFeatures, normalise
from u2seg.ops.discovery import PoolOptions, discover
from u2seg.ops.maskcut import discovery_score, maskcut_batch, nonfinite_images
from u2seg.ops.refine import refine_stack, resize_masks, resolve_backend, upsample_masks
from u2seg.workers.vit import BackboneActor

# Per-annotation fields kept in the shards; ids are given when instances.json is merged.
_KEPT = ("segmentation", "bbox", "area", "iscrowd", "category_id", "score")


def cut_options(cfg: MaskCutConfig) -> dict[str, Any]:
    """The keyword options of `maskcut_batch`, every one taken from `cfg` (a missing one is
    an AttributeError, not a silently published default)."""
    params = inspect.signature(maskcut_batch).parameters.values()
    return {p.name: getattr(cfg, p.name) for p in params if p.kind is p.KEYWORD_ONLY}


def pool_masks(
    out: ViTFeatures, images: Sequence[int], cfg: MaskCutConfig
) -> list[list[tuple[np.ndarray, float]]]:
    """Candidate-pool discovery (`discovery: pool`, u2seg.ops.discovery) of the images
    `images` of a ViT batch `out`: per image, its masks at patch resolution with their
    scores, best first."""
    assert out.keys is not None and out.attention is not None
    options = PoolOptions(
        n_masks=cfg.n_masks,
        depth=cfg.pool_depth,
        max_k=cfg.pool_max_k,
        min_patches=cfg.pool_min_patches,
        nms_iou=cfg.pool_nms_iou,
    )
    chosen = list(images)
    return discover([out.keys[chosen], out.patch_tokens[chosen]], out.attention[chosen], options)


def refine_masks(
    image: np.ndarray,
    masks: list[np.ndarray],
    size: tuple[int, int],
    cfg: MaskCutConfig,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[int]]:
    """Patch masks (h, w) of one square frame `image` (S, S, 3) -> the refined bool masks
    (K', H, W) of the original `size`, on `device` (the ViT's), and the indices in `masks`
    of the K' kept: a mask is dropped when the refinement drops it (unless
    `cfg.keep_unrefined`: then the mask before refinement is kept) or when it is empty at the
    original size. Every step runs on all the masks at once."""
    if not masks:
        return torch.zeros((0, *size), dtype=torch.bool, device=device), []
    frames = upsample_masks(torch.from_numpy(np.stack(masks)).to(device), image.shape[:2])
    refined, kept = refine_stack(image, frames, backend=cfg.crf, min_iou=cfg.min_refine_iou)
    used = torch.ones_like(kept) if cfg.keep_unrefined else kept
    full = resize_masks(torch.where(kept[:, None, None], refined, frames)[used], size)
    present = full.flatten(1).any(1)
    return full[present], used.nonzero().flatten()[present].tolist()


#: One found mask: bool (h, w) at patch resolution, whether its eigensolver converged, and
#: its pool score (None: MaskCut rounds, scored by discovery order).
Found = tuple[np.ndarray, bool, float | None]


class MaskCutWorker(BackboneActor):
    """Ray Data actor: square images -> MaskCut pseudo masks as COCO annotations per image."""

    def __init__(
        self,
        backbone: dict[str, Any],
        options: dict[str, Any],
        threads: int | None = None,
        state: Any = None,
    ) -> None:
        super().__init__(backbone, threads, state)
        # The backend this worker really runs ("auto" resolved): recorded in every row.
        self.cfg = replace(MaskCutConfig(**options), crf=resolve_backend(options["crf"]))

    def cut(self, images: np.ndarray) -> list[list[Found] | None]:
        """uint8 (B, S, S, 3) -> per image, its masks at patch resolution, best first, each
        with whether its eigensolver converged and its pool score (None for MaskCut rounds,
        ranked by discovery order); None for an image whose features are not finite."""
        cfg = self.cfg
        pool = cfg.discovery == "pool"
        with torch.inference_mode():
            out = self.model(
                normalise(images, self.device), want_keys=pool or cfg.feature == "keys"
            )
        grid = out.keys if cfg.feature == "keys" or pool else out.patch_tokens
        assert grid is not None
        bad = set(nonfinite_images(grid))
        if pool:  # the pool reads the tokens too
            bad |= set(nonfinite_images(out.patch_tokens))
        good = [i for i in range(len(images)) if i not in bad]
        found = iter(self._pool(out, good) if pool else self._rounds(grid[good]))
        return [None if i in bad else next(found) for i in range(len(images))]

    def _rounds(self, grid: torch.Tensor) -> list[list[Found]]:
        """The published MaskCut rounds of a (B, h, w, d) batch: the masks they added."""
        cfg = self.cfg
        rounds = maskcut_batch(grid.float(), cfg.n_masks, cfg.tau, **cut_options(cfg))
        return [
            [(r.mask, r.converged, None) for r in image if r.mask is not None] for image in rounds
        ]

    def _pool(self, out: ViTFeatures, good: list[int]) -> list[list[Found]]:
        """Candidate-pool discovery of the images `good` of the batch (always converged)."""
        return [[(m, True, v) for m, v in ranked] for ranked in pool_masks(out, good, self.cfg)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"].copy()
        ok = np.flatnonzero(errors == "")
        annotations = np.full(len(errors), "[]", dtype=object)
        converged = np.full(len(errors), "[]", dtype=object)
        if len(ok):
            for i, found in zip(ok, self.cut(batch["image"][ok]), strict=True):
                if found is None:
                    errors[i] = "non-finite backbone features (NaN or inf)"
                    continue
                size = (int(batch["height"][i]), int(batch["width"][i]))
                full, index = refine_masks(
                    batch["image"][i], [m for m, _, _ in found], size, self.cfg, self.device
                )
                kept = [found[j] for j in index]
                # Rounds: scores rank the kept masks in discovery order; pool: its scores.
                anns = [
                    rle_to_annotation(rle, 0, 0, score=discovery_score(k) if v is None else v)
                    for k, (rle, (_, _, v)) in enumerate(
                        zip(masks_to_rles(full), kept, strict=True)
                    )
                ]
                annotations[i] = json.dumps([{k: a[k] for k in _KEPT} for a in anns])
                converged[i] = json.dumps([flag for _, flag, _ in kept])
        result = {k: v for k, v in batch.items() if k != "image"}
        result["annotations"] = annotations
        result["converged"] = converged
        result["error"] = errors
        result["refine"] = np.full(len(errors), self.cfg.crf, dtype=object)
        return result
