"""sdxl_runtime without weights: configs, parameter names and shapes of the FULL-SIZE nets, and the numeric kernels
checked against closed forms (numpy only; no torch, no checkpoint).

Parameters are created lazily, so building the full-size base (3.47 G parameters) allocates nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.sdxl.configs import full_configs
from sdxl_ckpt.sdxl_runtime import config as C
from sdxl_ckpt.sdxl_runtime.device import Runtime, configure
from sdxl_ckpt.sdxl_runtime.model import SDXLNet
from sdxl_ckpt.testmodels.tiny import tiny_configs, tiny_runtime_config

# published parameter counts of SDXL 1.0 (diffusers' num_parameters(); OpenCLIP + logit_scale)
UNET_BASE_PARAMS = 2_567_463_684
VAE_PARAMS = 83_653_863
CLIP_L_PARAMS = 123_060_480
OPENCLIP_G_PARAMS = 694_659_841


@pytest.fixture(scope="module", autouse=True)
def _cpu() -> None:
    configure("CPU")


def _shapes(net: SDXLNet) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in net.named_params().items()}


@pytest.mark.parametrize("variant", ["base", "refiner", "lcm"])
def test_full_size_names_and_shapes_equal_the_keymap(variant: str) -> None:
    config = C.preset(variant)
    if variant == "lcm":
        config = C.with_logit_scale(C.with_cond_proj(config, 256), True)
    shapes = _shapes(SDXLNet(config))
    keymap = load_keymap(variant)
    expected = {s.ms: s.shape for s in keymap.specs if s.ms is not None}
    required = {s.ms for s in keymap.specs if s.ms is not None and s.required}
    assert required <= set(shapes), sorted(required - set(shapes))[:5]
    assert set(shapes) <= set(expected), sorted(set(shapes) - set(expected))[:5]
    assert {k: shapes[k] for k in shapes} == {k: expected[k] for k in shapes}


def test_full_size_base_parameter_counts() -> None:
    net = SDXLNet(C.preset("base"))
    count: dict[str, int] = {}
    for name, p in net.named_params().items():
        part = name.split(".")[0] if not name.startswith("conditioner") else ".".join(name.split(".")[:3])
        count[part] = count.get(part, 0) + math.prod(p.shape)
    assert count == {
        "model": UNET_BASE_PARAMS,
        "first_stage_model": VAE_PARAMS,
        "conditioner.embedders.0": CLIP_L_PARAMS,
        "conditioner.embedders.1": OPENCLIP_G_PARAMS,
    }


def test_fp16_runtime_creates_half_parameters_but_keeps_the_vae_in_fp32() -> None:
    net = SDXLNet(tiny_runtime_config("base"), Runtime("CPU", "fp16"))
    dtypes = {name.split(".")[0]: str(p.dtype) for name, p in net.named_params().items()}
    assert dtypes == {"model": "Float16", "conditioner": "Float16", "first_stage_model": "Float32"}


def _filled(config: C.SDXLConfig, dtype: str) -> SDXLNet:
    """A net whose every parameter holds seeded random values (same values for every dtype)."""
    import zlib

    from mindspore import Tensor

    net = SDXLNet(config, Runtime("CPU", dtype))
    for name, p in net.named_params().items():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        scale = 0.1 if len(p.shape) < 2 else 1.0 / math.sqrt(math.prod(p.shape[1:]))
        values = rng.standard_normal(p.shape) * scale + (1.0 if name.endswith(".gamma") else 0.0)
        p.set_data(Tensor(values.astype(np.float16 if str(p.dtype) == "Float16" else np.float32)))
    return net


def test_fp16_compute_path_stays_close_to_fp32() -> None:
    """Half-precision weights and activations (norms, softmax, embeddings in fp32) on a shallow tiny base."""
    from dataclasses import replace

    from mindspore import Tensor

    cfg = tiny_runtime_config("base")
    cfg = replace(
        cfg,
        unet=replace(
            cfg.unet,
            transformer_depth=((1, 1),) * 3,  # per level, per layer (2 resnets down, 3 up)
            transformer_depth_up=((1, 1, 1),) * 3,
            transformer_depth_middle=1,
        ),
        clip_l=replace(cfg.clip_l, num_layers=2),
        openclip=replace(cfg.openclip, num_layers=2),
    )
    nets = {dtype: _filled(cfg, dtype) for dtype in ("fp32", "fp16")}
    ids = np.zeros((1, 77), np.int64)
    ids[0, :4] = [512, 40, 41, 513]
    rng = np.random.default_rng(0)
    x, ctx, y = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 8, 8), (1, 77, 96), (1, 128)))
    outs = {}
    for dtype, net in nets.items():
        texts = net.conditioner.encode_text(ids, ids)
        eps = net.model.diffusion_model(Tensor(x), Tensor(np.array([500.0], np.float32)), Tensor(ctx), Tensor(y))
        outs[dtype] = [t.asnumpy().astype(np.float64) for t in (*texts, eps)]
    assert outs["fp32"][-1].dtype == np.float64 and str(eps.dtype) == "Float32"  # fp32 out of the fp16 UNet
    for a, b in zip(outs["fp32"], outs["fp16"]):
        assert np.all(np.isfinite(b)) and np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2


def test_components_subset_builds_only_those() -> None:
    names = SDXLNet(tiny_runtime_config("base"), components=("vae",)).named_params()
    assert names and all(n.startswith("first_stage_model.") for n in names)
    with pytest.raises(InputError):
        SDXLNet(tiny_runtime_config("base"), components=("unet", "text"))


# --- configs --------------------------------------------------------------------------------------------------


def test_preset_numbers_are_sdxl() -> None:
    base, refiner = C.preset("base"), C.preset("refiner")
    assert (base.unet.context_dim, base.unet.adm_in_channels, base.context_dim) == (2048, 2816, 2048)
    assert base.unet.transformer_depth == ((1, 1), (2, 2), (10, 10)) and base.unet.transformer_depth_middle == 10
    assert base.unet.transformer_depth_up == ((1, 1, 1), (2, 2, 2), (10, 10, 10))
    assert base.unet.num_heads == (5, 10, 20) and base.unet.attention == (False, True, True)
    assert (refiner.unet.context_dim, refiner.unet.adm_in_channels, refiner.is_refiner) == (1280, 2560, True)
    assert refiner.unet.attention == refiner.unet.attention_up == (False, True, True, False)
    assert refiner.unet.transformer_depth_middle == 4 and refiner.num_size_scalars == 5
    assert base.clip_l.hidden_act == "quick_gelu" and base.openclip.hidden_act == "gelu"
    assert base.openclip.projection_dim == 1280 and base.vae.scaling_factor == 0.13025


def test_from_metadata_reads_json_configs() -> None:
    import json

    configs = tiny_configs("base")
    meta = {C.METADATA_PREFIX + k: json.dumps(v) for k, v in configs.items()}
    meta["sdxl_ckpt.variant"] = "lcm"
    config = C.from_metadata(meta)
    assert config.variant == "lcm" and config == C.from_diffusers_configs(**configs, variant="lcm")
    del meta[C.METADATA_PREFIX + "vae"]
    with pytest.raises(InputError, match="sdxl_ckpt.config.vae"):
        C.from_metadata(meta)


@pytest.mark.parametrize(
    "key,value",
    [
        ("mid_block_type", "UNetMidBlock2D"),
        ("addition_embed_type", "text"),
        ("flip_sin_to_cos", False),
    ],
)
def test_unsupported_unet_options_are_refused(key: str, value: object) -> None:
    configs = full_configs("base")
    configs["unet"][key] = value
    with pytest.raises(InputError, match=key):
        C.from_diffusers_configs(**configs)


def test_inconsistent_widths_are_refused() -> None:
    configs = full_configs("base")
    configs["unet"]["cross_attention_dim"] = 1280
    with pytest.raises(InputError, match="context"):
        C.from_diffusers_configs(**configs)
    configs = full_configs("base")
    with pytest.raises(InputError, match="variant"):
        C.from_diffusers_configs(**configs, variant="refiner")


def test_runtime_options_are_validated() -> None:
    with pytest.raises(InputError, match="device"):
        Runtime("TPU")
    with pytest.raises(InputError, match="dtype"):
        Runtime("CPU", "bf16")
    assert Runtime("Ascend", "fp16").flash_attention and not Runtime("CPU", "fp16").flash_attention


# --- kernels against closed forms -------------------------------------------------------------------------------


def _closed_form_embedding(t: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    args = t[:, None].astype(np.float64) * np.exp(-math.log(10000) * np.arange(half) / half)[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)


def test_timestep_embedding_is_cos_first_and_accurate_at_large_arguments() -> None:
    from mindspore import Tensor

    from sdxl_ckpt.sdxl_runtime.layers import timestep_embedding

    t = np.array([0, 1, 24, 261, 999, 1024, 2.5], dtype=np.float32)
    for dim in (16, 256, 320):
        ours = timestep_embedding(Tensor(t), dim).asnumpy()
        exact = _closed_form_embedding(t, dim)
        assert ours.dtype == np.float32 and ours.shape == (len(t), dim)
        assert np.array_equal(ours[0], np.r_[np.ones(dim // 2), np.zeros(dim // 2)])
        # float32 rounding of t*f is the only error left (as in diffusers): well under 1e-5
        assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < 1e-5


def test_guidance_scale_embedding_closed_form() -> None:
    from sdxl_ckpt.sdxl_runtime.unet import guidance_scale_embedding

    w = np.array([0.0, 7.0, 2.5])
    ours = guidance_scale_embedding(w, 16)
    args = (w * 1000)[:, None] * np.exp(-math.log(10000) / 7 * np.arange(8))[None]
    exact = np.concatenate([np.sin(args), np.cos(args)], axis=1)  # sin first, frequencies over half - 1
    # diffusers rounds w*1000*f (up to 7000) to float32 as we do: ~4e-4 absolute on the largest arguments
    assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) < 1e-4
    assert guidance_scale_embedding(w, 17).shape == (3, 17)


def _conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    ho, wo = (xp.shape[2] - k) // stride + 1, (xp.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], patch)
    return out + b[None, :, None, None]


@pytest.mark.parametrize(
    "kernel,stride,pad,chunk",
    [
        (3, 1, 1, None),
        (3, 2, 1, None),
        (3, 2, 0, None),
        (1, 1, 0, None),
        (3, 1, 1, 4096),
        (3, 2, 1, 2048),
        (3, 2, 0, 1),
    ],
)
def test_cpu_convolution_equals_the_definition(
    monkeypatch: pytest.MonkeyPatch, kernel: int, stride: int, pad: int, chunk: int | None
) -> None:
    from mindspore import Tensor

    from sdxl_ckpt.sdxl_runtime import layers

    if chunk is not None:  # force several row chunks
        monkeypatch.setattr(layers, "IM2COL_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(kernel * 10 + stride)
    x = rng.standard_normal((2, 6, 9, 11)).astype(np.float32)
    conv = layers.conv2d(6, 5, kernel, Runtime(), stride=stride, padding=pad)
    w = rng.standard_normal(tuple(conv.weight.shape)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    conv.weight.set_data(Tensor(w))
    conv.bias.set_data(Tensor(b))
    ours = conv(Tensor(x)).asnumpy()
    ref = _conv_reference(x, w, b, stride, pad)
    assert ours.shape == ref.shape
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-6


def test_host_arena_places_tensors_apart_on_aligned_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from sdxl_ckpt.sdxl_runtime import host_memory

    monkeypatch.setattr(host_memory, "BLOCK_BYTES", 4 * host_memory.HUGE_PAGE)
    blocks: list[host_memory._Block] = []
    real = host_memory._Block.__init__

    def record(self: host_memory._Block, nbytes: int) -> None:
        real(self, nbytes)
        blocks.append(self)

    monkeypatch.setattr(host_memory._Block, "__init__", record)
    arena = host_memory.HugePageArena()
    shapes = [(3, 5), (1000, 1000), (7,), (), (0, 4), (3 * 1024, 1024), (11, 13)]  # the 12 MiB one: its own block
    arrays = [arena.empty(shape, np.float32) for shape in shapes]
    for i, (shape, array) in enumerate(zip(shapes, arrays)):
        assert array.shape == shape and array.dtype == np.float32 and array.flags.c_contiguous
        array[...] = i
        assert array.size == 0 or array.ctypes.data % host_memory.ALIGN == 0
    for i, array in enumerate(arrays):  # nothing overlaps: every tensor still holds what was written to it
        assert np.all(array == i)
    assert [b.bytes.ctypes.data % host_memory.HUGE_PAGE for b in blocks] == [0] * len(blocks)
    assert len(blocks) == 2 and blocks[1].bytes.size >= 12 << 20
    maps = [weakref.ref(b.map) for b in blocks]
    arena.close()
    blocks.clear()
    del arrays[5]  # the large tensor's block goes with it; the shared block stays while a tensor in it lives
    assert [m() is None for m in maps] == [False, True]
    del arrays, array
    assert [m() is None for m in maps] == [True, True]


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (4, 3, 2)])
def test_host_columns_are_mindspores_unfold(
    monkeypatch: pytest.MonkeyPatch, kernel: int, stride: int, pad: int
) -> None:
    """The numpy im2col (whole and in bands of output rows, its channels split over the workers) holds exactly what
    ``ops.unfold`` builds."""
    from mindspore import Tensor, ops

    from sdxl_ckpt.formats import workers
    from sdxl_ckpt.sdxl_runtime import im2col

    monkeypatch.setattr(workers, "SPLIT_MIN_BYTES", 0)

    x = np.random.default_rng(5).standard_normal((2, 5, 13, 10)).astype(np.float32)
    expected = ops.unfold(Tensor(x), kernel_size=kernel, padding=pad, stride=stride).asnumpy()
    ho, wo = (13 + 2 * pad - kernel) // stride + 1, (10 + 2 * pad - kernel) // stride + 1
    padded = im2col.zero_padded(x, pad)
    assert np.array_equal(im2col.columns(padded, kernel, stride, (0, ho), wo), expected)
    bands = [im2col.columns(padded, kernel, stride, (r0, min(ho, r0 + 2)), wo) for r0 in range(0, ho, 2)]
    joined = np.concatenate([band.reshape(2, -1, band.shape[-1] // wo, wo) for band in bands], axis=2)
    assert np.array_equal(joined.reshape(expected.shape), expected)


def test_nearest_upsampling_is_exact() -> None:
    from mindspore import Tensor

    from sdxl_ckpt.sdxl_runtime.layers import upsample_nearest2x

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    expected = x.repeat(2, axis=2).repeat(2, axis=3)
    for native in (False, True):  # CPU's interpolate kernel and the broadcast every backend runs
        assert np.array_equal(upsample_nearest2x(Tensor(x), native).asnumpy(), expected)


def test_eot_position_rules() -> None:
    from sdxl_ckpt.sdxl_runtime.text_encoders import eot_positions

    ids = np.array([[49406, 320, 49407, 49407, 49407], [49406, 320, 321, 49407, 0]])
    assert eot_positions(ids, 2).tolist() == [2, 3]  # legacy: argmax, first on ties
    assert eot_positions(np.array([[5, 7, 3, 9, 3]]), 3).tolist() == [2]  # first eos_token_id
