"""diffusers-to-sd on the tiny SDXL-shaped models: key sets, bit-exact values, peer check, inputs, failures.

The expected SD key sets come from mindone's published lists (tests/data/mindone/), not from our rule tables;
the peer check reads our files back with diffusers' own single-file converters.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sdxl_ckpt.cli import main
from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd
from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.diffusers_folder import find_weight_files, read_component
from sdxl_ckpt.formats.entries import entry_from_array
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
from sdxl_ckpt.keymaps.diffusers_plan import plan_sd_entries
from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES, map_component_keys, unet_blocks

DATA = Path(__file__).parent / "data" / "mindone"
CLIP_L_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
COND_PROJ = "model.diffusion_model.time_cond_proj.weight"
WEIGHT_FILE = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


# --- expected key sets (mindone's lists) ---------------------------------------------------------------------------


def _names(filename: str) -> list[str]:
    return (DATA / filename).read_text().split()


def base_key_set() -> set[str]:
    """The official sd_xl_base_1.0 key set: mindone's torch list + the CLIP-L position_ids it leaves out."""
    return set(_names("torch_key_base.txt")) | {CLIP_L_POSITION_IDS}


def refiner_key_set() -> set[str]:
    """mindone's refiner list (MindSpore names) back in SD names."""
    renames = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"), (r"\.embedding_table$", ".weight"))
    out = set()
    for name in _names("mindspore_key_refiner.txt"):
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        out.add(name)
    return out


def _count(names, prefix: str) -> int:
    return sum(n.startswith(prefix) for n in names)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_full_size_configs_map_to_the_mindone_sets(variant):
    """The REAL SDXL structures (full configs on the meta device, no memory) map exactly onto mindone's lists."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from sdxl_ckpt.sdxl.configs import full_configs
    from sdxl_ckpt.testmodels.full import meta_model

    names = set()
    for component, config in full_configs(variant).items():
        model = meta_model(component, config)
        keys = [
            ("text_model." + k if component == "text_encoder" and not k.startswith("text_model.") else k)
            for k in model.state_dict()
        ]
        cmap = map_component_keys(component, keys, config, SD_PREFIXES[variant][component])
        assert not cmap.unknown and not cmap.missing and not cmap.dropped
        names |= {t.name for t in cmap.targets} | {name for name, _ in cmap.generated}
    assert names == (base_key_set() if variant == "base" else refiner_key_set())


def test_mindone_lists_have_the_published_counts():
    base, refiner = base_key_set(), refiner_key_set()
    assert len(base) == 2515
    assert [_count(base, p) for p in SD_PREFIXES["base"].values()] == [1680, 248, 197, 390]
    assert len(refiner) == 1858
    assert [_count(refiner, p) for p in SD_PREFIXES["refiner"].values()] == [1220, 248, 390]


# --- helpers ---------------------------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {e.name: e.load() for e in read_safetensors(path).entries}


def _dtypes(path: Path) -> dict[str, str]:
    return {e.name: e.dtype for e in read_safetensors(path).entries}


def _component_tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(_tensors(path))
    return out


def _convert(src: Path, out: Path, **kwargs) -> dict:
    return convert_diffusers_to_sd(src, out, quiet=True, **kwargs)


def _link_pipeline(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A pipeline folder whose components are symlinks to ``src``'s (so one component can be replaced cheaply)."""
    dst.mkdir(parents=True)
    for child in src.iterdir():
        if child.name not in skip:
            (dst / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
    return dst


def _resave_component(src: Path, dst: Path, edit) -> Path:
    """Copy a component folder (config + plain weights) with ``edit(tensors) -> tensors`` applied to the weights."""
    from safetensors.numpy import save_file

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    name = WEIGHT_FILE[src.name] + ".safetensors"
    save_file(edit(_tensors(src / name)), str(dst / name), metadata={"format": "pt"})
    return dst


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- converted outputs, once per session ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("d2sd")


@pytest.fixture(scope="module")
def base_out(tiny_base, outdir):
    out = outdir / "base.safetensors"
    return out, _convert(tiny_base, out)


@pytest.fixture(scope="module")
def refiner_out(tiny_refiner, outdir):
    out = outdir / "refiner.safetensors"
    return out, _convert(tiny_refiner, out)


@pytest.fixture(scope="module")
def lcm_out(tiny_lcm, outdir):
    out = outdir / "lcm.safetensors"
    return out, _convert(tiny_lcm, out, unet_dir=tiny_lcm / "lcm-unet", lcm=True)


@pytest.fixture(scope="module")
def lcm_cp_out(tiny_lcm_cond_proj, outdir):
    out = outdir / "lcm_cp.safetensors"
    return out, _convert(tiny_lcm_cond_proj, out, unet_dir=tiny_lcm_cond_proj / "lcm-unet")


@pytest.fixture(scope="module")
def fp16_sharded(tmp_path_factory) -> Path:
    """A base pipeline saved as *.fp16.safetensors with the UNet sharded (index json + shards)."""
    pytest.importorskip("diffusers")
    from sdxl_ckpt.testmodels.tiny import build_tiny_model

    return build_tiny_model(
        "base", tmp_path_factory.mktemp("fp16sh") / "pipe", variant_fp16=True, unet_max_shard_size="4MB"
    )


# --- key sets --------------------------------------------------------------------------------------------------------


def test_base_key_set_is_official(base_out):
    out, report = base_out
    names = set(_dtypes(out))
    assert names == base_key_set()
    assert [_count(names, p) for p in SD_PREFIXES["base"].values()] == [1680, 248, 197, 390]
    rows = {r["component"]: r for r in report["components"]}
    assert [rows[c]["written"] for c in SD_PREFIXES["base"]] == [1680, 248, 197, 390]
    assert report["tensors"] == 2515 and report["architecture"] == "base" and report["variant"] == "base"


def test_refiner_key_set_is_official(refiner_out):
    out, report = refiner_out
    names = set(_dtypes(out))
    assert names == refiner_key_set()
    assert not any(n.startswith("conditioner.embedders.1.") for n in names)
    assert report["architecture"] == "refiner" and report["tensors"] == 1858


def test_lcm_key_set_is_base_set_and_unet_comes_from_unet_dir(lcm_out, tiny_lcm):
    out, report = lcm_out
    assert set(_dtypes(out)) == base_key_set()
    meta = read_safetensors(out).metadata
    assert meta["sdxl_ckpt.variant"] == "lcm"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["sdxl_ckpt.source.unet"] == str((tiny_lcm / "lcm-unet").resolve())
    written = _tensors(out)["model.diffusion_model.input_blocks.0.0.weight"]
    lcm_src = _component_tensors(tiny_lcm / "lcm-unet")["conv_in.weight"]
    base_src = _component_tensors(tiny_lcm / "unet")["conv_in.weight"]
    assert np.array_equal(written, lcm_src) and not np.array_equal(written, base_src)


def test_lcm_cond_proj_is_kept_and_reported(lcm_cp_out, tiny_lcm_cond_proj):
    out, report = lcm_cp_out
    assert set(_dtypes(out)) == base_key_set() | {COND_PROJ}
    src = _component_tensors(tiny_lcm_cond_proj / "lcm-unet")["time_embedding.cond_proj.weight"]
    assert np.array_equal(_tensors(out)[COND_PROJ], src)
    assert report["variant"] == "lcm"  # a guidance-embedded UNet is LCM even without --lcm
    assert any("time_cond_proj" in n for n in report["notes"])


def test_metadata(base_out, tiny_base):
    out, _ = base_out
    meta = read_safetensors(out).metadata
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "sgm"
    assert meta["modelspec.title"]
    assert meta["sdxl_ckpt.variant"] == "base"
    assert meta["sdxl_ckpt.version"]
    for component in SD_PREFIXES["base"]:
        assert meta[f"sdxl_ckpt.source.{component}"] == str((tiny_base / component).resolve())
        assert meta[f"sdxl_ckpt.config.{component}"] == (tiny_base / component / "config.json").read_text()


# --- values: bit for bit after undoing the documented transforms --------------------------------------------------


def _undo(transform: str, value: np.ndarray, count: int) -> list[np.ndarray]:
    if transform == "transpose":
        return [value.T]
    if transform == "conv1x1":
        assert value.shape[2:] == (1, 1)
        return [value[:, :, 0, 0]]
    if transform == "concat_qkv":
        return np.split(value, count, axis=0)
    return [value]


def _check_bit_exact(out: Path, pipe: Path, arch: str, unet_dir: Path | None = None) -> None:
    written = _tensors(out)
    used = set()
    for component, prefix in SD_PREFIXES[arch].items():
        folder = unet_dir if component == "unet" and unet_dir else pipe / component
        source = read_component(component, folder)
        src = {e.name: e.load() for e in source.entries}
        cmap = map_component_keys(component, src, source.config, prefix)
        assert not cmap.unknown
        assert set(src) == {k for t in cmap.targets for k in t.sources} | set(cmap.dropped)
        for target in cmap.targets:
            parts = _undo(target.transform, written[target.name], len(target.sources))
            for key, part in zip(target.sources, parts):
                assert part.dtype == src[key].dtype and part.shape == src[key].shape, key
                assert part.tobytes() == src[key].tobytes(), f"{target.name} != {key}"
            used.add(target.name)
        used.update(name for name, _generator in cmap.generated)
    assert used == set(written)


def test_base_tensors_bit_exact(base_out, tiny_base):
    _check_bit_exact(base_out[0], tiny_base, "base")


def test_refiner_tensors_bit_exact(refiner_out, tiny_refiner):
    _check_bit_exact(refiner_out[0], tiny_refiner, "refiner")


def test_lcm_cond_proj_tensors_bit_exact(lcm_cp_out, tiny_lcm_cond_proj):
    _check_bit_exact(lcm_cp_out[0], tiny_lcm_cond_proj, "base", tiny_lcm_cond_proj / "lcm-unet")


def test_generated_tensors(base_out, refiner_out):
    base = _tensors(base_out[0])
    ids = base[CLIP_L_POSITION_IDS]
    assert ids.dtype == np.int64 and ids.shape == (1, 77) and np.array_equal(ids[0], np.arange(77))
    assert base["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert float(base["conditioner.embedders.1.model.logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
    refiner = _tensors(refiner_out[0])
    assert float(refiner["conditioner.embedders.0.model.logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
    assert not any(n.endswith("position_ids") for n in refiner)


# --- peer check: diffusers' own converters read our file back -----------------------------------------------------


def _peer_check(out: Path, pipe: Path, arch: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    checkpoint = load_file(str(out))

    def same(converted: dict, folder: Path) -> None:
        expected = {}
        for path in sorted(folder.glob("*.safetensors")):
            expected.update(load_file(str(path)))
        assert set(converted) == set(expected)
        for key, value in expected.items():
            got = converted[key].contiguous()
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got.view(torch.uint8), value.contiguous().view(torch.uint8)), key

    unet_cfg = json.loads((pipe / "unet" / "config.json").read_text())
    same(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_cfg), pipe / "unet")
    vae_cfg = json.loads((pipe / "vae" / "config.json").read_text())
    same(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_cfg), pipe / "vae")
    if arch == "base":
        clip = sfu.convert_ldm_clip_checkpoint(checkpoint)
        assert torch.equal(clip.pop("text_model.embeddings.position_ids"), torch.arange(77)[None])
        same(clip, pipe / "text_encoder")

    class _Model:  # convert_open_clip_checkpoint only reads .config
        config = CLIPTextConfig.from_pretrained(str(pipe / "text_encoder_2"))

    same(
        sfu.convert_open_clip_checkpoint(_Model, checkpoint, prefix=SD_PREFIXES[arch]["text_encoder_2"]),
        pipe / "text_encoder_2",
    )


@pytest.mark.torch
def test_peer_check_base(base_out, tiny_base):
    _peer_check(base_out[0], tiny_base, "base")


@pytest.mark.torch
def test_peer_check_refiner(refiner_out, tiny_refiner):
    _peer_check(refiner_out[0], tiny_refiner, "refiner")


# --- input variants ------------------------------------------------------------------------------------------------


def test_fp16_variant_and_sharded_unet(fp16_sharded, base_out, tmp_path):
    assert len(list((fp16_sharded / "unet").glob("*.fp16-*-of-*.safetensors"))) > 1
    out = tmp_path / "fp16.safetensors"
    report = _convert(fp16_sharded, out, variant="fp16")
    dtypes = _dtypes(out)
    assert set(dtypes) == base_key_set()
    assert {d for n, d in dtypes.items() if n != CLIP_L_POSITION_IDS} == {"F16"}
    assert dtypes[CLIP_L_POSITION_IDS] == "I64"
    unet_row = next(r for r in report["components"] if r["component"] == "unet")
    assert len(unet_row["weights"]) > 1 and unet_row["weights_variant"] == "fp16"
    _check_bit_exact(out, fp16_sharded, "base")


def test_fp16_only_folder_without_variant_uses_it_with_a_note(fp16_sharded, tmp_path):
    _, _, report = plan_sd_entries(fp16_sharded)
    assert any("only fp16 weights" in n for n in report["notes"])


def test_flat_clip_l_keys(tiny_base, base_out, tmp_path):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("text_encoder",))
    _resave_component(
        tiny_base / "text_encoder",
        pipe / "text_encoder",
        lambda t: {k.removeprefix("text_model."): v for k, v in t.items()},
    )
    flat_keys = read_safetensors(pipe / "text_encoder" / "model.safetensors").by_name()
    assert not any(k.startswith("text_model.") for k in flat_keys)
    out = tmp_path / "flat.safetensors"
    report = _convert(pipe, out)
    got, expected = _tensors(out), _tensors(base_out[0])
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.tobytes() == expected[key].tobytes(), key
    assert any("text_model. level" in n for n in report["notes"])


def test_dtype_fp16_from_fp32_keeps_position_ids_int64(tiny_base, base_out, tmp_path):
    out = tmp_path / "half.safetensors"
    _convert(tiny_base, out, dtype="fp16")
    half, full, dtypes = _tensors(out), _tensors(base_out[0]), _dtypes(out)
    assert dtypes.pop(CLIP_L_POSITION_IDS) == "I64"
    assert set(dtypes.values()) == {"F16"}
    assert np.array_equal(half[CLIP_L_POSITION_IDS], full[CLIP_L_POSITION_IDS])
    for key, value in full.items():
        if key != CLIP_L_POSITION_IDS:
            assert half[key].tobytes() == value.astype(np.float16).tobytes(), key


@pytest.mark.torch
def test_dtype_bf16_rounds_like_torch(tiny_base, base_out, tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "bf16.safetensors"
    _convert(tiny_base, out, dtype="bf16")
    bf16, full, dtypes = _tensors(out), _tensors(base_out[0]), _dtypes(out)
    assert dtypes.pop(CLIP_L_POSITION_IDS) == "I64"
    assert set(dtypes.values()) == {"BF16"}
    for key, value in full.items():
        if key != CLIP_L_POSITION_IDS:
            expected = torch.from_numpy(np.array(value)).to(torch.bfloat16).view(torch.int16).numpy()
            assert bf16[key].tobytes() == expected.tobytes(), key


def test_stray_position_ids_are_dropped_and_reported(tiny_base, base_out, tmp_path):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("text_encoder", "text_encoder_2"))
    stray = np.arange(77, dtype=np.int64)[None]
    _resave_component(
        tiny_base / "text_encoder_2",
        pipe / "text_encoder_2",
        lambda t: {**t, "text_model.embeddings.position_ids": stray},
    )
    _resave_component(
        tiny_base / "text_encoder",
        pipe / "text_encoder",
        lambda t: {**t, "text_model.embeddings.position_ids": stray.astype(np.float32) + 0.25},
    )
    out = tmp_path / "stray.safetensors"
    report = _convert(pipe, out)
    assert set(_dtypes(out)) == base_key_set()
    dropped = {(d["component"], d["key"]): d["reason"] for d in report["dropped"]}
    assert "OpenCLIP" in dropped[("text_encoder_2", "text_model.embeddings.position_ids")]
    assert "regenerated" in dropped[("text_encoder", "text_model.embeddings.position_ids")]
    ids = _tensors(out)[CLIP_L_POSITION_IDS]
    assert ids.dtype == np.int64 and np.array_equal(ids[0], np.arange(77))


# --- streaming ------------------------------------------------------------------------------------------------------


def test_planning_reads_no_tensor_bytes(tiny_base, monkeypatch):
    import sdxl_ckpt.formats.safetensors_io as sio

    calls = []
    real = sio._reader

    def counting_reader(*args):
        load = real(*args)
        return lambda: calls.append(args[1]) or load()

    monkeypatch.setattr(sio, "_reader", counting_reader)
    entries, _, report = plan_sd_entries(tiny_base)
    assert len(entries) == 2515 and calls == []
    entries[0].load()
    assert calls  # the loaders do read, one tensor each


def test_peak_memory_is_far_below_model_size(tiny_base, tmp_path):
    out = tmp_path / "mem.safetensors"
    tracemalloc.start()
    try:
        report = _convert(tiny_base, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report["bytes"] > 50 * 2**20
    assert peak < report["bytes"] / 10, (peak, report["bytes"])


# --- CLI and bad input ----------------------------------------------------------------------------------------------


def test_cli_report_and_json(tiny_base, tmp_path, capsys):
    out, js = tmp_path / "cli.safetensors", tmp_path / "report.json"
    rc, stdout, _ = _run(["diffusers-to-sd", str(tiny_base), "-o", str(out), "--json", str(js), "-q"], capsys)
    assert rc == 0 and out.is_file()
    assert "unet" in stdout and "text_encoder_2" in stdout and "2515 tensors" in stdout
    report = json.loads(js.read_text())
    assert report["tensors"] == 2515 and report["seconds"] >= 0 and report["file_bytes"] == out.stat().st_size
    assert {r["component"] for r in report["components"]} == set(SD_PREFIXES["base"])


def _assert_clean_failure(rc: int, err: str, out: Path, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary file left behind"


def test_missing_component_folder(tiny_base, tmp_path, capsys):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("vae",))
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(pipe), "-o", str(out), "-q"], capsys)
    _assert_clean_failure(rc, err, out, "vae")


def test_truncated_safetensors(tiny_base, tmp_path, capsys):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("vae",))
    (pipe / "vae").mkdir()
    shutil.copy(tiny_base / "vae" / "config.json", pipe / "vae")
    data = (tiny_base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    (pipe / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(pipe), "-o", str(out), "-q"], capsys)
    _assert_clean_failure(rc, err, out, "diffusion_pytorch_model.safetensors", "truncated")


def test_unexpected_key_in_a_component(tiny_base, tmp_path, capsys):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("vae",))
    _resave_component(
        tiny_base / "vae", pipe / "vae", lambda t: {**t, "decoder.extra_head.weight": np.zeros(3, np.float32)}
    )
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(pipe), "-o", str(out), "-q"], capsys)
    _assert_clean_failure(
        rc, err, out, str(pipe / "vae" / "diffusion_pytorch_model.safetensors"), "decoder.extra_head.weight"
    )


def test_missing_key_in_a_component(tiny_base, tmp_path, capsys):
    pipe = _link_pipeline(tiny_base, tmp_path / "pipe", skip=("vae",))
    _resave_component(
        tiny_base / "vae",
        pipe / "vae",
        lambda t: {k: v for k, v in t.items() if k != "decoder.up_blocks.1.resnets.2.conv1.weight"},
    )
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(pipe), "-o", str(out), "-q"], capsys)
    _assert_clean_failure(rc, err, out, "incomplete vae", "first_stage_model.decoder.up.2.block.2.conv1.weight")


def test_existing_output_needs_overwrite(tiny_base, tmp_path, capsys):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    rc, _, err = _run(["diffusers-to-sd", str(tiny_base), "-o", str(out), "-q"], capsys)
    assert rc == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "--overwrite" in err and out.read_bytes() == b"keep me"
    rc, _, _ = _run(["diffusers-to-sd", str(tiny_base), "-o", str(out), "-q", "--overwrite"], capsys)
    assert rc == 0 and len(read_safetensors(out).entries) == 2515


def test_index_naming_a_missing_shard(fp16_sharded, tmp_path, capsys):
    pipe = _link_pipeline(fp16_sharded, tmp_path / "pipe", skip=("unet",))
    shutil.copytree(fp16_sharded / "unet", pipe / "unet")
    victim = sorted((pipe / "unet").glob("*-of-*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(pipe), "-o", str(out), "-q", "--variant", "fp16"], capsys)
    _assert_clean_failure(rc, err, out, victim.name, "missing")


def test_lcm_flag_with_a_refiner_unet(tiny_refiner, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(tiny_refiner), "-o", str(out), "-q", "--lcm"], capsys)
    _assert_clean_failure(rc, err, out, "refiner")


def test_bad_dtype(tiny_base, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(["diffusers-to-sd", str(tiny_base), "-o", str(out), "-q", "--dtype", "fp8"], capsys)
    _assert_clean_failure(rc, err, out, "fp8")


# --- weight-file choice (small synthetic folders) -------------------------------------------------------------------


def _touch_weights(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".safetensors"):
            write_safetensors(folder / name, [entry_from_array("w", np.zeros(2, np.float32))])
        else:
            (folder / name).write_bytes(b"not read")


@pytest.mark.parametrize(
    "files, variant, chosen, note",
    [
        (("model.safetensors", "model.fp16.safetensors"), None, "model.safetensors", None),
        (("model.safetensors", "model.fp16.safetensors"), "fp16", "model.fp16.safetensors", None),
        (("model.fp16.safetensors",), None, "model.fp16.safetensors", "only fp16"),
        (("model.safetensors",), "fp16", "model.safetensors", "no fp16 variant"),
        (("model.safetensors", "model.bin"), None, "model.safetensors", "ignored pickle"),
    ],
)
def test_weight_choice(tmp_path, files, variant, chosen, note):
    _touch_weights(tmp_path, *files)
    weights = find_weight_files(tmp_path, variant)
    assert [p.name for p in weights.files] == [chosen]
    assert (note is None and not weights.notes) or any(note in n for n in weights.notes)


@pytest.mark.parametrize(
    "files, variant, message",
    [
        (("model.fp16.safetensors", "model.bf16.safetensors"), None, "several weight variants"),
        (("model.bin",), None, "pickle"),
        (("model.safetensors", "model.safetensors.index.json"), None, "ambiguous"),
        (("model.safetensors", "diffusion_pytorch_model.safetensors"), None, "ambiguous"),
        ((), None, "no weights"),
        (("model.bf16.safetensors",), "fp16", "no 'fp16' weights"),
    ],
)
def test_weight_choice_errors(tmp_path, files, variant, message):
    _touch_weights(tmp_path, *files)
    with pytest.raises(InputError, match=message):
        find_weight_files(tmp_path, variant)


def test_shard_with_a_key_the_index_does_not_list(tmp_path):
    folder = tmp_path / "vae"
    _touch_weights(folder, "diffusion_pytorch_model-00001-of-00001.safetensors")
    (folder / "config.json").write_text(json.dumps({"block_out_channels": [32]}))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"other": "diffusion_pytorch_model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(KeyMismatchError, match="does not list it"):
        read_component("vae", folder)


# --- the rule tables are derived from the config --------------------------------------------------------------------


def _two_level_unet_config() -> dict:
    return {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 3],
        "addition_embed_type": None,
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 4],
        "norm_num_groups": 32,
        "sample_size": 8,
    }


@pytest.mark.torch
def test_two_level_unet_round_trips_through_diffusers_converter():
    """No 3-level assumption: a 2-level, 1-layer UNet maps to names diffusers' converter maps back one to one."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _two_level_unet_config()
    with torch.device("meta"):
        keys = list(UNet2DConditionModel.from_config(config).state_dict())
    cmap = map_component_keys("unet", keys, config, "model.diffusion_model.")
    assert not cmap.unknown and len(cmap.targets) == len(keys)
    checkpoint = {t.name: torch.tensor([i]) for i, t in enumerate(cmap.targets)}
    back = convert_ldm_unet_checkpoint(checkpoint, config)
    assert {k: int(v) for k, v in back.items()} == {t.sources[0]: i for i, t in enumerate(cmap.targets)}


def test_block_indices_follow_the_config():
    blocks = {b.diffusers: (b.sd, b.depth) for b in unet_blocks(_two_level_unet_config())}
    assert blocks["down_blocks.0.resnets.0."] == ("input_blocks.1.0.", 0)
    assert blocks["down_blocks.0.downsamplers.0.conv."] == ("input_blocks.2.0.op.", 0)
    assert blocks["down_blocks.1.attentions.0."] == ("input_blocks.3.1.", 3)
    assert blocks["mid_block.attentions.0."] == ("middle_block.1.", 3)
    assert blocks["up_blocks.0.attentions.1."] == ("output_blocks.1.1.", 3)
    assert blocks["up_blocks.0.upsamplers.0.conv."] == ("output_blocks.1.2.conv.", 0)
    assert "down_blocks.1.downsamplers.0.conv." not in blocks and "up_blocks.1.upsamplers.0.conv." not in blocks


def test_transformer_depth_and_missing_qkv_are_checked():
    config = _two_level_unet_config()
    deep = "down_blocks.1.attentions.0.transformer_blocks.3.norm1.weight"  # depth 3: blocks 0..2 only
    assert map_component_keys("unet", [deep], config, "").unknown == [deep]
    te2 = {"num_hidden_layers": 2}
    keys = [f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in ("q", "v")]
    with pytest.raises(KeyMismatchError, match="missing k"):
        map_component_keys("text_encoder_2", keys, te2, "p.")
    assert map_component_keys("text_encoder_2", ["text_model.encoder.layers.2.mlp.fc1.weight"], te2, "p.").unknown
