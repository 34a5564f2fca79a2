"""Every row of the variants table, and the SD files other tools write, convert correctly or are refused in one line.

One tiny model per row that differs in its weights or schedule, built with the real diffusers classes:
inpainting (9 input channels), instruct-pix2pix (8), Playground v2.5 (EDM: ``edm_mean`` / ``edm_std``), v-prediction
with zero terminal SNR (``v_pred`` / ``ztsnr``), SSD-1B- and Vega-like depths. Each: diffusers -> SD (peer-checked
by diffusers' own single-file loader), inspect names the variant, SD -> ckpt -> SD bit for bit. Community files are
made from the tiny base SD file: keys in another order, no metadata, float position_ids, trainer leftovers,
diffusers-style VAE attention, no VAE (+ ``--vae``), pruned text-encoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main
from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.sdxl.architecture import infer_architecture
from sdxl_ckpt.sdxl.variants import (
    BASE_SENTINEL,
    COND_PROJ_KEY,
    REFINER_SENTINEL,
    VARIANT_METADATA,
    VARIANTS,
    detect_variant,
)

pytest.importorskip("diffusers")
ms = pytest.importorskip("mindspore")

ROWS = ("inpaint", "pix2pix", "playground-v2.5", "v-pred", "ssd-1b", "vega")
MARKERS_OF = {"playground-v2.5": {"edm_mean", "edm_std"}, "v-pred": {"v_pred", "ztsnr"}}
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
L = "conditioner.embedders.0.transformer.text_model."
G = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (diffusers folder, SD file)."""
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
    from sdxl_ckpt.testmodels.tiny import build_shape_model

    folder = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ROWS:
        pipe = build_shape_model(name, folder / name)
        sd = folder / f"{name}.safetensors"
        convert_diffusers_to_sd(pipe, sd)
        out[name] = (pipe, sd)
    return out


@pytest.fixture(scope="module")
def base_sd(tiny_base, tmp_path_factory) -> Path:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd

    sd = tmp_path_factory.mktemp("community") / "base.safetensors"
    convert_diffusers_to_sd(tiny_base, sd)
    return sd


def _run(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key, array in a.items():
        assert b[key].dtype == array.dtype and b[key].shape == array.shape and b[key].tobytes() == array.tobytes(), key


def _round_trip(sd: Path, tmp_path: Path, capsys, *extra) -> tuple[str, dict, Path]:
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back.safetensors"
    rc, out, err = _run(["st-to-ms", sd, "-o", ckpt, "--json", tmp_path / "to.json", *extra], capsys)
    assert rc == 0, err
    rc, _out, err = _run(["ms-to-st", ckpt, "-o", back, "-q"], capsys)
    assert rc == 0, err
    return out, json.loads((tmp_path / "to.json").read_text()), back


# --- one model per row ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROWS)
def test_row_converts_both_ways_and_is_named(models, tmp_path, capsys, name):
    _pipe, sd = models[name]
    original = load_file(sd)
    assert MARKERS_OF.get(name, set()) <= set(original)
    rc, out, _err = _run(["inspect", sd], capsys)
    assert rc == 0 and f"variant: {name} " in out
    out, report, back = _round_trip(sd, tmp_path, capsys)
    assert f"variant {name} " in out and report["variant"] == name
    assert set(report["markers"]) == MARKERS_OF.get(name, set())
    _same(original, load_file(back))
    # the ckpt alone (no metadata) still says what it is: markers and shapes survive
    rc, out, _err = _run(["inspect", tmp_path / "m.ckpt"], capsys)
    assert rc == 0 and f"variant: {name} " in out
    from safetensors import safe_open

    with safe_open(str(back), "np") as handle:
        assert handle.metadata()[VARIANT_METADATA] == name


@pytest.mark.parametrize("name", ROWS)
def test_diffusers_single_file_loader_agrees(models, name):
    """diffusers reads our SD file into the same weights as the folder; its own type detection agrees where it
    knows the kind (inpainting, Playground v2.5); for the others it sees an SDXL base and the folder's config
    tells it the rest."""
    import diffusers
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file as load_torch

    pipe, sd = models[name]
    assert infer_diffusers_model_type(load_torch(sd)) == (VARIANTS[name].diffusers_type or "xl_base")
    cls = getattr(diffusers, VARIANTS[name].pipeline)
    ours = cls.from_single_file(str(sd), config=str(pipe), local_files_only=True)
    ref = cls.from_pretrained(pipe, local_files_only=True)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, component).state_dict(), getattr(ref, component).state_dict()
        assert set(a) == set(b), component
        assert all(torch.equal(a[k], b[k]) for k in b), component
    if name == "playground-v2.5":
        assert ours.vae.config.scaling_factor == 0.5 and ours.vae.config.latents_mean == ref.vae.config.latents_mean


# --- community-style SD files -----------------------------------------------------------------------------------


def _community(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tiny base as a trainer / merge tool saves it: reversed key order, float position_ids, leftovers,
    diffusers-style VAE attention (linear shapes)."""
    tensors = dict(reversed(list(base.items())))
    tensors[POSITION_IDS] = tensors[POSITION_IDS].astype(np.float32)
    for part in ("encoder", "decoder"):
        prefix = f"first_stage_model.{part}.mid.attn_1."
        for ldm, diffusers in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            weight = tensors.pop(f"{prefix}{ldm}.weight")
            tensors[f"{prefix}{diffusers}.weight"] = weight.reshape(weight.shape[:2])
            tensors[f"{prefix}{diffusers}.bias"] = tensors.pop(f"{prefix}{ldm}.bias")
    tensors["betas"] = np.linspace(0.00085, 0.012, 1000, dtype=np.float32)
    tensors["alphas_cumprod"] = np.cumprod(1 - tensors["betas"])
    tensors["denoiser.sigmas"] = np.ones(1000, np.float32)
    tensors["model_ema.decay"] = np.array(0.9999, np.float32)
    tensors["model_ema.diffusion_modelinput_blocks00weight"] = base["model.diffusion_model.input_blocks.0.0.weight"]
    return tensors


def test_community_file_converts_with_notes(base_sd, tmp_path, capsys):
    base = load_file(base_sd)
    path = tmp_path / "community.safetensors"
    save_file(_community(base), path)  # no metadata
    out, report, back = _round_trip(path, tmp_path, capsys)
    assert report["variant"] == "base" and "--keys lcm" in out  # no metadata: base, could be an LCM
    assert set(report["dropped"]) == {
        "betas",
        "alphas_cumprod",
        "denoiser.sigmas",
        "model_ema.decay",
        "model_ema.diffusion_modelinput_blocks00weight",
    }
    assert all(report["dropped"].values())
    notes = " ".join(report["notes"])
    assert "F32: written as int64" in notes and "diffusers style (16 tensors" in notes
    # what comes back is the SD layout: exactly the tensors diffusers-to-sd wrote, same bytes
    _same(base, load_file(back))


def test_no_vae_is_refused_unless_given(base_sd, tmp_path, capsys):
    base = load_file(base_sd)
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in base.items() if not k.startswith("first_stage_model.")}, no_vae)
    rc, _out, err = _run(["st-to-ms", no_vae, "-o", tmp_path / "x.ckpt"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--vae" in err
    assert not (tmp_path / "x.ckpt").exists()
    vae = tmp_path / "sdxl_vae.safetensors"  # a standalone VAE file: LDM names without the prefix
    save_file({k.removeprefix("first_stage_model."): v for k, v in base.items() if k.startswith("first_stage")}, vae)
    out, report, back = _round_trip(no_vae, tmp_path, capsys, "--vae", vae)
    assert any("VAE (248 tensors) taken from" in n for n in report["notes"])
    _same(base, load_file(back))


def test_pruned_clip_l_is_optional_pruned_openclip_refused(base_sd, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(base_sd), "np") as handle:
        metadata = handle.metadata()
    base = load_file(base_sd)
    last = L + "encoder.layers.11."
    pruned = {k: v for k, v in base.items() if not k.startswith((last, L + "final_layer_norm."))}
    path = tmp_path / "pruned.safetensors"
    save_file(pruned, path, metadata)  # the metadata says 12 layers; the file holds 11
    out, report, back = _round_trip(path, tmp_path, capsys)
    assert all(k.startswith((last, L + "final_layer_norm.")) for k in report["optional_absent"])
    assert len(report["optional_absent"]) == 18
    _same(pruned, load_file(back))
    no_last_block = {k: v for k, v in base.items() if not k.startswith(G + "transformer.resblocks.31.")}
    path = tmp_path / "pruned_g.safetensors"
    save_file(no_last_block, path, metadata)
    rc, _out, err = _run(["st-to-ms", path, "-o", tmp_path / "g.ckpt"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "pooled" in err


def test_unknown_rows_are_refused_in_one_line(base_sd, models, tmp_path, capsys):
    base = load_file(base_sd)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    seven = dict(base)
    seven[conv_in] = np.zeros((32, 7, 3, 3), np.float32)
    path = tmp_path / "seven.safetensors"
    save_file(seven, path)
    rc, _out, err = _run(["st-to-ms", path, "-o", tmp_path / "x.ckpt"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "7 input channels" in err and conv_in in err
    both = dict(load_file(models["playground-v2.5"][1]))
    both["v_pred"] = np.zeros((0,), np.float32)
    both[conv_in] = np.zeros((32, 9, 3, 3), np.float32)
    path = tmp_path / "both.safetensors"
    save_file(both, path)
    rc, _out, err = _run(["st-to-ms", path, "-o", tmp_path / "y.ckpt"], capsys)
    assert rc == 2 and "several variants at once (inpaint + playground-v2.5)" in err


def test_old_ckpt_without_position_ids_still_converts(base_sd, tmp_path, capsys):
    from dataclasses import replace

    from sdxl_ckpt.formats.ckpt_io import scan_ckpt, write_ckpt

    ckpt = tmp_path / "new.ckpt"
    assert _run(["st-to-ms", base_sd, "-o", ckpt, "-q"], capsys)[0] == 0
    loaded = ms.load_checkpoint(str(ckpt))
    assert loaded[POSITION_IDS].dtype == ms.int32 and loaded[POSITION_IDS].shape == (1, 77)
    old = tmp_path / "old.ckpt"
    write_ckpt(old, [replace(e) for e in scan_ckpt(ckpt).entries if e.name != POSITION_IDS])
    back = tmp_path / "back.safetensors"
    rc, out, err = _run(["ms-to-st", old, "-o", back], capsys)
    assert rc == 0 and "restored: " + POSITION_IDS in out, err
    _same(load_file(base_sd), load_file(back))


# --- the one detector -------------------------------------------------------------------------------------------


def _full(variant: str) -> dict[str, tuple[int, ...]]:
    return {s.sd: s.shape for s in load_keymap(variant).specs}


def test_detector():
    def variant(shapes, metadata=None):
        return infer_architecture(shapes, metadata).detection

    assert variant(_full("base")).variant == "base" and variant(_full("base")).note  # could be an LCM
    assert variant(_full("base"), {VARIANT_METADATA: "base"}).note is None
    assert variant(_full("refiner")).variant == "refiner"
    assert variant(_full("base"), {VARIANT_METADATA: "lcm"}).variant == "lcm"
    assert variant(_full("lcm")).variant == "lcm" and COND_PROJ_KEY in _full("lcm")  # the guidance embedding
    ms_names = {load_keymap("refiner").sd_to_ms[k]: v for k, v in _full("refiner").items()}
    assert variant(ms_names).variant == "refiner"
    assert variant({**_full("base"), "v_pred": (0,), "ztsnr": (0,)}).variant == "v-pred"
    arch = infer_architecture({**_full("base"), "edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)})
    assert arch.variant == "playground-v2.5" and arch.scheduler["_class_name"] == "EDMDPMSolverMultistepScheduler"
    assert arch.configs["vae"]["scaling_factor"] == 0.5
    assert infer_architecture({**_full("base"), "v_pred": (0,), "ztsnr": (0,)}).scheduler["rescale_betas_zero_snr"]
    with pytest.raises(InputError, match="neither"):
        variant({"a.weight": (1,)})
    with pytest.raises(InputError, match="both"):
        variant({BASE_SENTINEL: (1280,), REFINER_SENTINEL: (1280,)})
    with pytest.raises(InputError, match="metadata"):
        variant(_full("refiner"), {VARIANT_METADATA: "lcm"})
    with pytest.raises(InputError, match="refiner with marker tensors"):
        variant({**_full("refiner"), "v_pred": (0,)})
    # an LCM-distilled SSD-1B: the schedule names the variant, the depths are a note
    ssd = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
    found = detect_variant(
        "base", {**ssd, "transformer_layers_per_block": [1, 2, 4]}, frozenset(), {VARIANT_METADATA: "lcm"}
    )
    assert found.variant == "lcm" and "ssd-1b" in found.note
