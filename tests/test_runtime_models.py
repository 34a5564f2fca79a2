"""sdxl_runtime on the tiny SDXL-shaped models: strict loading of converted ckpts, and module-level agreement with
diffusers / transformers on the same weights in float32 (relative L2 < 1e-5 for every stage).

The ckpts come from the project's own chain (diffusers-to-sd, then st-to-ms), so a naming or layout difference
anywhere between diffusers and the runtime fails here. torch is used by these tests only, never by sdxl_runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd  # noqa: E402
from sdxl_ckpt.convert.sd_ms import st_to_ms  # noqa: E402
from sdxl_ckpt.errors import KeyMismatchError  # noqa: E402
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, write_ckpt  # noqa: E402
from sdxl_ckpt.formats.safetensors_io import read_safetensors  # noqa: E402
from sdxl_ckpt.sdxl_runtime.api import SDXLRuntime  # noqa: E402
from sdxl_ckpt.sdxl_runtime.config import SDXLConfig, from_metadata  # noqa: E402

RTOL = 1e-5
BATCH = 2
BOS, EOS = 512, 513  # the tiny byte-level vocabulary puts the two specials last, as real CLIP does


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@dataclass
class Converted:
    folder: Path  # the diffusers pipeline
    unet_dir: Path  # its UNet (the lcm-unet subfolder for LCM)
    ckpt: Path  # MindSpore .ckpt (no metadata)
    ms_safetensors: Path  # MindSpore names in safetensors (with the SD file's metadata)
    config: SDXLConfig


def _convert(folder: Path, out: Path, unet_dir: Path | None = None) -> Converted:
    sd = out / "sd.safetensors"
    convert_diffusers_to_sd(folder, sd, unet_dir=unet_dir, overwrite=True)
    st_to_ms(sd, out / "ms.ckpt", overwrite=True)
    st_to_ms(sd, out / "ms.safetensors", fmt="safetensors", overwrite=True)
    return Converted(
        folder,
        unet_dir or folder / "unet",
        out / "ms.ckpt",
        out / "ms.safetensors",
        from_metadata(read_safetensors(sd).metadata),
    )


@pytest.fixture(scope="session")
def base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert(tiny_base, tmp_path_factory.mktemp("rt_base"))


@pytest.fixture(scope="session")
def refiner(tiny_refiner: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert(tiny_refiner, tmp_path_factory.mktemp("rt_refiner"))


@pytest.fixture(scope="session")
def lcm_cp(tiny_lcm_cond_proj: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert(tiny_lcm_cond_proj, tmp_path_factory.mktemp("rt_lcm"), tiny_lcm_cond_proj / "lcm-unet")


_RUNTIMES: dict[tuple[str, str], SDXLRuntime] = {}


def runtime(conv: Converted, dtype: str = "fp32") -> SDXLRuntime:
    """One loaded runtime per (ckpt, dtype) for the whole session."""
    key = (str(conv.ckpt), dtype)
    if key not in _RUNTIMES:
        _RUNTIMES[key] = SDXLRuntime.from_checkpoint(conv.ckpt, conv.config, dtype=dtype)
    return _RUNTIMES[key]


def token_ids(seed: int, pad: int) -> np.ndarray:
    """[BATCH, 77]: BOS, random byte tokens of different lengths, EOS, then padding (EOS for CLIP-L, "!" for G)."""
    rng = np.random.default_rng(seed)
    ids = np.full((BATCH, 77), pad, dtype=np.int64)
    for row, n in enumerate((5, 40)[:BATCH]):
        ids[row, 0], ids[row, n + 1] = BOS, EOS
        ids[row, 1 : n + 1] = rng.integers(1, 512, n)
    return ids


IDS_L, IDS_G = token_ids(1, EOS), token_ids(1, 0)
ORIG = np.array([[1024, 768], [512, 2048]], np.float32)[:BATCH]
CROP = np.array([[0, 0], [48, 16]], np.float32)[:BATCH]
TARGET = np.array([[1024, 1024], [768, 1536]], np.float32)[:BATCH]
AESTHETIC = np.array([[6.0], [2.5]], np.float32)[:BATCH]


# --- strict loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "refiner", "lcm_cp"])
def test_tiny_ckpt_loads_with_no_missing_or_unexpected_key(name: str, request: pytest.FixtureRequest) -> None:
    conv: Converted = request.getfixturevalue(name)
    rt = runtime(conv)
    keys = {e.name for e in scan_ckpt(conv.ckpt).entries}
    ids = {k for k in keys if k.endswith(".position_ids")}  # written for mindone; this network derives it
    assert len(ids) == (0 if name == "refiner" else 1)
    assert set(rt.net.named_params()) == keys - ids
    assert rt.load_report.tensors == len(keys - ids) and rt.load_report.skipped == len(ids)
    if name == "lcm_cp":
        assert rt.config.unet.time_cond_proj_dim == 16
        assert "model.diffusion_model.time_cond_proj.weight" in keys


def test_ms_safetensors_loads_with_its_own_config(base: Converted) -> None:
    rt = SDXLRuntime.from_checkpoint(base.ms_safetensors, components=("vae",))
    assert rt.config == base.config
    assert rt.load_report.tensors == len(rt.net.named_params()) and rt.load_report.skipped > 0


def test_ckpt_without_config_builds_from_its_shapes(base: Converted, tmp_path: Path) -> None:
    """A .ckpt has no metadata: the config is read from its shapes (heads by convention), and it loads; one
    written before position_ids was kept (the key absent) loads the same."""
    rt = SDXLRuntime.from_checkpoint(base.ckpt, components=("vae", "conditioner"))
    assert any("inferred" in n for n in rt.notes)
    assert rt.config.unet.block_out_channels == base.config.unet.block_out_channels
    assert rt.config.openclip.hidden_size == base.config.openclip.hidden_size
    ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    old = _edited(base.ckpt, tmp_path / "old.ckpt", drop=(ids,))
    assert SDXLRuntime.from_checkpoint(old, base.config).load_report.skipped == 0


def _edited(
    src: Path, out: Path, rename: dict[str, str] | None = None, drop: tuple[str, ...] = (), reshape: str | None = None
) -> Path:
    entries = []
    for e in scan_ckpt(src).entries:
        if e.name in drop:
            continue
        if reshape == e.name:
            e = replace(e, shape=(*e.shape, 1), loader=lambda e=e: e.load().reshape(*e.shape, 1))
        entries.append(replace(e, name=(rename or {}).get(e.name, e.name)))
    write_ckpt(out, entries, overwrite=True)
    return out


def test_one_renamed_key_is_refused_naming_it(base: Converted, tmp_path: Path) -> None:
    good = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.norm2.gamma"
    bad = good.replace(".gamma", ".weight")
    ckpt = _edited(base.ckpt, tmp_path / "renamed.ckpt", rename={good: bad})
    with pytest.raises(KeyMismatchError) as err:
        SDXLRuntime.from_checkpoint(ckpt, base.config)
    assert err.value.key == good
    assert f"1 parameter(s) missing from the file: {good}" in str(err.value)
    assert f"1 unexpected key(s) no parameter takes: {bad}" in str(err.value)


def test_shape_mismatch_and_foreign_keys_are_refused(base: Converted, tmp_path: Path) -> None:
    key = "first_stage_model.decoder.conv_in.bias"
    ckpt = _edited(base.ckpt, tmp_path / "reshaped.ckpt", reshape=key)
    with pytest.raises(KeyMismatchError, match=r"decoder\.conv_in\.bias \(file \[\d+, 1\], network \[\d+\]\)"):
        SDXLRuntime.from_checkpoint(ckpt, base.config, components=("vae",))
    ckpt = _edited(base.ckpt, tmp_path / "foreign.ckpt", rename={key: "global_step"})
    with pytest.raises(KeyMismatchError, match="global_step"):  # not a component's key: never skipped
        SDXLRuntime.from_checkpoint(ckpt, base.config, components=("unet",))


def test_missing_logit_scale_is_fitted_but_missing_weights_are_not(base: Converted, tmp_path: Path) -> None:
    logit = "conditioner.embedders.1.model.logit_scale"
    rt = SDXLRuntime.from_checkpoint(
        _edited(base.ckpt, tmp_path / "nologit.ckpt", drop=(logit,)), base.config, components=("conditioner",)
    )
    assert logit not in rt.net.named_params() and rt.notes == ["OpenCLIP logit_scale absent in the file"]
    gone = "conditioner.embedders.1.model.ln_final.beta"
    with pytest.raises(KeyMismatchError) as err:
        SDXLRuntime.from_checkpoint(_edited(base.ckpt, tmp_path / "noln.ckpt", drop=(gone,)), base.config)
    assert err.value.key == gone


# --- agreement with diffusers / transformers ----------------------------------------------------------------------


def _text_reference(folder: Path, refiner: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.no_grad():
        enc2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
        out2 = enc2(torch.from_numpy(IDS_G), output_hidden_states=True)
        clip_l = None
        if not refiner:
            enc1 = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
            clip_l = enc1(torch.from_numpy(IDS_L), output_hidden_states=True).hidden_states[-2].numpy()
    return clip_l, out2.hidden_states[-2].numpy(), out2.text_embeds.numpy()


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_text_encoders_agree_with_transformers(name: str, request: pytest.FixtureRequest) -> None:
    conv: Converted = request.getfixturevalue(name)
    rt = runtime(conv)
    refiner = name == "refiner"
    clip_l, hidden, pooled = rt.encode_text(None if refiner else IDS_L, IDS_G)
    ref_l, ref_g, ref_pooled = _text_reference(conv.folder, refiner)
    if not refiner:
        assert rel_l2(clip_l, ref_l) < RTOL
    assert rel_l2(hidden, ref_g) < RTOL
    assert rel_l2(pooled, ref_pooled) < RTOL


def _unet_reference(
    conv: Converted,
    x: np.ndarray,
    t: np.ndarray,
    context: np.ndarray,
    pooled: np.ndarray,
    time_ids: np.ndarray,
    timestep_cond: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' eps and the y it builds internally (input of add_embedding) for the same inputs."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(conv.unet_dir).eval()
    seen: dict[str, Any] = {}
    unet.add_embedding.register_forward_hook(lambda _m, args, _o: seen.update(y=args[0].numpy().copy()))
    kwargs = {} if timestep_cond is None else {"timestep_cond": torch.from_numpy(timestep_cond)}
    with torch.no_grad():
        eps = unet(
            torch.from_numpy(x),
            torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(context),
            added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)},
            **kwargs,
        ).sample.numpy()
    return eps, seen["y"]


@pytest.mark.parametrize("name", ["base", "refiner", "lcm_cp"])
def test_conditioning_and_one_unet_evaluation_agree_with_diffusers(name: str, request: pytest.FixtureRequest) -> None:
    conv: Converted = request.getfixturevalue(name)
    rt = runtime(conv)
    refiner = name == "refiner"
    rng = np.random.default_rng(5)
    clip_l = None if refiner else rng.standard_normal((BATCH, 77, rt.config.clip_l.hidden_size)).astype(np.float32)
    hidden = rng.standard_normal((BATCH, 77, rt.config.openclip.hidden_size)).astype(np.float32)
    pooled = rng.standard_normal((BATCH, rt.config.openclip.projection_dim)).astype(np.float32)
    context, y = rt.conditioning(
        clip_l,
        hidden,
        pooled,
        original_size=ORIG,
        crop_coords_top_left=CROP,
        target_size=TARGET,
        aesthetic_score=AESTHETIC,
    )
    time_ids = np.concatenate([ORIG, CROP, AESTHETIC if refiner else TARGET], axis=1)
    x = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
    t = np.array([999, 261][:BATCH], dtype=np.int64)
    w_cond = None
    if name == "lcm_cp":
        from diffusers import StableDiffusionXLPipeline

        w_cond = rt.guidance_embedding(np.array([8.0, 3.0][:BATCH]), BATCH)
        ref_w = StableDiffusionXLPipeline.get_guidance_scale_embedding(
            None, torch.tensor([7.0, 2.0][:BATCH]), embedding_dim=16
        ).numpy()
        assert rel_l2(w_cond, ref_w) < RTOL
    ref_eps, ref_y = _unet_reference(conv, x, t, context, pooled, time_ids, w_cond)
    assert context.shape == (BATCH, 77, rt.config.unet.context_dim)
    assert rel_l2(y, ref_y) < RTOL
    assert rel_l2(rt.unet(x, t, context, y, w_cond), ref_eps) < RTOL


def test_vae_decode_and_encode_agree_with_diffusers(base: Converted) -> None:
    from diffusers import AutoencoderKL

    rt = runtime(base)
    rng = np.random.default_rng(7)
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    image = np.tanh(rng.standard_normal((1, 3, 64, 64))).astype(np.float32)
    vae = AutoencoderKL.from_pretrained(base.folder / "vae").eval()
    with torch.no_grad():
        ref_image = vae.decode(torch.from_numpy(z)).sample.numpy()
        ref_mean = vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
    assert rel_l2(rt.decode(z), ref_image) < RTOL
    assert rel_l2(rt.encode(image), ref_mean) < RTOL
