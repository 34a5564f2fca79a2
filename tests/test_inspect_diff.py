"""``inspect`` and ``diff`` on the tiny SDXL-shaped models in every layout, through the real CLI.

Hashes are checked against references computed here with hashlib and the safetensors library (not our reader).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main
from sdxl_ckpt.sdxl.components import component_of

UNET = "model.diffusion_model."
SD_COUNTS = {"unet": 1680, "vae": 248, "clip_l": 197, "openclip": 390}  # SDXL base, official layout


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tiny_base: Path, tiny_refiner: Path, tiny_lcm_cond_proj: Path, tmp_path_factory) -> dict[str, Path]:
    """SD files of the three variants, the base as ckpt and as MindSpore-named safetensors."""
    out = tmp_path_factory.mktemp("inspect_files")
    made = {
        "base_sd": out / "base.safetensors",
        "refiner_sd": out / "refiner.safetensors",
        "lcm_sd": out / "lcm.safetensors",
        "base_ckpt": out / "base.ckpt",
        "base_ms_st": out / "base_ms.safetensors",
    }
    steps = [
        ["diffusers-to-sd", tiny_base, "-o", made["base_sd"]],
        ["diffusers-to-sd", tiny_refiner, "-o", made["refiner_sd"]],
        ["diffusers-to-sd", tiny_lcm_cond_proj, "--unet", tiny_lcm_cond_proj / "lcm-unet", "-o", made["lcm_sd"]],
        ["st-to-ms", made["base_sd"], "-o", made["base_ckpt"]],
        ["st-to-ms", made["base_sd"], "-o", made["base_ms_st"], "--format", "safetensors"],
    ]
    for step in steps:
        assert main([*map(str, step), "-q", "--json", str(out / "report.json")]) == 0, step
    return made


def inspect_json(capsys, path: Path, *extra: str) -> dict:
    rc, out, err = run(capsys, "inspect", path, "-q", "--json", "-", *extra)
    assert rc == 0, err
    return json.loads(out)


def by_component(report: dict) -> dict[str, int]:
    return {row["component"]: row["tensors"] for row in report["components"]}


def test_inspect_sd_base_text(capsys, files):
    rc, out, err = run(capsys, "inspect", files["base_sd"], "-q")
    assert rc == 0 and err == ""
    assert "SD safetensors" in out and "variant: base" in out
    assert "keys in no known component: none" in out
    assert "modelspec.architecture: stable-diffusion-xl-v1-base" in out
    for component, count in SD_COUNTS.items():
        assert any(line.split()[:2] == [component, str(count)] for line in out.splitlines()), component


@pytest.mark.parametrize(
    "name, fmt, variant, counts",
    [
        ("base_sd", "sd", "base", SD_COUNTS),
        ("refiner_sd", "sd", "refiner", {"unet": 1220, "vae": 248, "openclip": 390}),
        ("lcm_sd", "sd", "lcm", {**SD_COUNTS, "unet": 1681}),
        ("base_ckpt", "ckpt", "base", SD_COUNTS),  # position_ids included (int32, as mindone declares it)
        ("base_ms_st", "ms-safetensors", "base", SD_COUNTS),
    ],
)
def test_inspect_json_every_layout(capsys, files, name, fmt, variant, counts):
    report = inspect_json(capsys, files[name])
    assert report["format"] == fmt and report["variant"] == variant
    assert by_component(report) == counts
    assert report["unknown_keys"] == []
    assert report["tensors"] == sum(counts.values()) == len(report["tensor_list"])
    assert report["tensor_bytes"] == sum(t["bytes"] for t in report["tensor_list"])
    assert report["scan_seconds"] < 5


def test_inspect_diffusers_folders(capsys, tiny_base, tiny_refiner, tiny_lcm_cond_proj):
    base = inspect_json(capsys, tiny_base)
    assert base["format"] == "diffusers" and base["variant"] == "base"
    # diffusers keeps q/k/v apart and has no position_ids / logit_scale: 196 + 517 text-encoder keys
    assert by_component(base) == {"unet": 1680, "vae": 248, "clip_l": 196, "openclip": 517}
    assert len(base["files"]) == 4
    refiner = inspect_json(capsys, tiny_refiner)
    assert refiner["variant"] == "refiner" and "clip_l" not in by_component(refiner)
    lcm_unet = inspect_json(capsys, tiny_lcm_cond_proj / "lcm-unet")
    assert lcm_unet["format"] == "diffusers-component" and lcm_unet["variant"] == "lcm"
    assert by_component(lcm_unet) == {"unet": 1681}
    rc, _out, err = run(capsys, "diff", tiny_lcm_cond_proj / "lcm-unet", tiny_base, "-q")
    assert rc == 2 and "not one component folder" in err
    one_file = inspect_json(capsys, tiny_base / "vae" / "diffusion_pytorch_model.safetensors")
    assert one_file["variant"] == "unknown" and len(one_file["unknown_keys"]) == 248
    assert any("one diffusers component's weight file" in n for n in one_file["notes"])


def test_inspect_writes_json_file(capsys, files, tmp_path):
    target = tmp_path / "r.json"
    rc, out, _ = run(capsys, "inspect", files["base_ckpt"], "-q", "--json", target)
    assert rc == 0 and "MindSpore ckpt" in out
    assert json.loads(target.read_text())["format"] == "ckpt"


def modelspec_reference(path: Path) -> str:
    """sha256 of every byte after the header, exactly as Stability's ModelSpec example computes it."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_len)
        return "0x" + hashlib.sha256(handle.read()).hexdigest()


def component_reference(tensors: dict[str, np.ndarray], component: str) -> str:
    digests = hashlib.sha256()
    for name in sorted(n for n in tensors if component_of(n) == component):
        digests.update(hashlib.sha256(np.ascontiguousarray(tensors[name]).tobytes()).digest())
    return digests.hexdigest()


def test_hash_matches_independent_reference(capsys, files):
    report = inspect_json(capsys, files["base_sd"], "--hash")
    assert report["hashes"][0]["content_sha256"] == modelspec_reference(files["base_sd"])
    tensors = load_file(files["base_sd"])
    for row in report["components"]:
        assert row["sha256"] == component_reference(tensors, row["component"]), row["component"]
    one = next(t for t in report["tensor_list"] if t["name"] == f"{UNET}out.2.weight")
    assert one["sha256"] == hashlib.sha256(tensors[one["name"]].tobytes()).hexdigest()
    assert report["nonfinite"] == []


def test_component_hashes_survive_conversion_to_ckpt(capsys, files):
    """Same bytes under MindSpore names hash alike: the ckpt's UNet / VAE / OpenCLIP hashes equal the SD file's."""
    sd = {r["component"]: r["sha256"] for r in inspect_json(capsys, files["base_sd"], "--hash")["components"]}
    ckpt = inspect_json(capsys, files["base_ckpt"], "--hash")
    ms = {r["component"]: r["sha256"] for r in ckpt["components"]}
    assert sd["unet"] == ms["unet"] and sd["vae"] == ms["vae"] and sd["openclip"] == ms["openclip"]
    assert sd["clip_l"] != ms["clip_l"]  # the ckpt holds position_ids as int32 (mindone's Parameter), SD as int64
    assert ckpt["hashes"][0]["convention"].startswith("sha256 of the tensor contents")


def test_stored_modelspec_hash_is_checked(capsys, tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float16), "b": np.ones((2, 2), dtype=np.float32)}
    save_file(tensors, tmp_path / "plain.safetensors")
    good = modelspec_reference(tmp_path / "plain.safetensors")
    save_file(tensors, tmp_path / "good.safetensors", metadata={"modelspec.hash_sha256": good})
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"modelspec.hash_sha256": "0x" + "0" * 64})
    rc, out, err = run(capsys, "inspect", tmp_path / "good.safetensors", "--hash", "-q")
    assert rc == 0 and "(matches modelspec.hash_sha256)" in out and err == ""
    rc, out, err = run(capsys, "inspect", tmp_path / "bad.safetensors", "--hash", "-q")
    assert rc == 1 and "MISMATCH" in out  # a difference found by a check
    assert err.count("\n") == 1 and err.startswith("warning:") and "modelspec.hash_sha256" in err


def test_inspect_unknown_keys_and_unknown_variant(capsys, tmp_path):
    save_file(
        {"model_ema.decay": np.ones(1, np.float32), f"{UNET}out.2.bias": np.zeros(4, np.float32)},
        tmp_path / "odd.safetensors",
    )
    report = inspect_json(capsys, tmp_path / "odd.safetensors")
    assert report["unknown_keys"] == ["model_ema.decay"]
    assert report["variant"] == "unknown" and "sentinel" in report["variant_reason"]
    rc, out, _ = run(capsys, "inspect", tmp_path / "odd.safetensors", "-q")
    assert rc == 0 and "keys in no known component (1):\n  model_ema.decay" in out


# --- diff -------------------------------------------------------------------------------------------------------------


def diff_json(capsys, a: Path, b: Path, *extra: str) -> tuple[int, dict]:
    rc, out, err = run(capsys, "diff", a, b, "-q", "--json", "-", *extra)
    assert rc in (0, 1), err
    return rc, json.loads(out)


def test_diff_identical_across_layouts(capsys, files, tiny_base):
    for other in (files["base_sd"], files["base_ckpt"], files["base_ms_st"], tiny_base):
        rc, report = diff_json(capsys, files["base_sd"], other)
        assert rc == 0 and report["identical"], other
        assert report["differences"] == [] and report["only_in_a"] == [] and report["only_in_b"] == []
    rc, report = diff_json(capsys, files["base_sd"], files["base_ckpt"])
    assert report["not_comparable"] == []  # the ckpt's int32 position_ids compares as the SD file's int64
    rc, out, _ = run(capsys, "diff", tiny_base, files["base_ckpt"], "-q")
    assert rc == 0 and out.rstrip().endswith("result: identical (2515 tensors compared)")


def test_diff_one_tensor_changed(capsys, files, tmp_path):
    tensors = load_file(files["base_sd"])
    key = f"{UNET}input_blocks.1.0.in_layers.2.weight"
    tensors[key] = tensors[key].copy()
    tensors[key].reshape(-1)[3] += np.float32(0.5)
    save_file(tensors, tmp_path / "changed.safetensors")
    rc, report = diff_json(capsys, files["base_ckpt"], tmp_path / "changed.safetensors")
    assert rc == 1 and not report["identical"]
    assert [d["key"] for d in report["differences"]] == [key]
    changed = report["differences"][0]
    assert changed["status"] == "values" and changed["differing"] == 1
    assert changed["max_abs"] == pytest.approx(0.5, rel=1e-3)
    unet = next(r for r in report["summary"] if r["component"] == "unet")
    assert unet["different"] == 1 and unet["identical"] == 1679
    rc, out, _ = run(capsys, "diff", files["base_sd"], tmp_path / "changed.safetensors", "-q")
    assert rc == 1 and f"  {key}: max abs 0.5" in out


def test_diff_only_in_a_and_b(capsys, files, tmp_path):
    tensors = load_file(files["base_sd"])
    gone = f"{UNET}out.2.bias"
    del tensors[gone]
    tensors["model_ema.num_updates"] = np.array([7], dtype=np.int64)
    save_file(tensors, tmp_path / "edited.safetensors")
    rc, report = diff_json(capsys, files["base_sd"], tmp_path / "edited.safetensors")
    assert rc == 1
    assert report["only_in_a"] == [gone] and report["only_in_b"] == ["model_ema.num_updates"]
    assert report["differences"] == []
    other = next(r for r in report["summary"] if r["component"] == "other")
    assert other["only_in_b"] == 1


def test_diff_dtype_and_shape(capsys, files, tmp_path):
    tensors = load_file(files["base_sd"])
    half, bias = f"{UNET}out.2.weight", f"{UNET}out.2.bias"
    tensors[half] = tensors[half].astype(np.float16)
    tensors[bias] = tensors[bias][:2].copy()
    save_file(tensors, tmp_path / "mixed.safetensors")
    rc, report = diff_json(capsys, files["base_sd"], tmp_path / "mixed.safetensors")
    assert rc == 1
    rows = {d["key"]: d for d in report["differences"]}
    assert set(rows) == {half, bias}
    assert rows[bias]["status"] == "shape" and rows[bias]["b_shape"] == [2]
    assert rows[half]["b_dtype"] == "F16" and rows[half]["status"] == "values"
    assert 0 < rows[half]["max_rel"] < 1e-3


def test_diff_keys_option_and_bad_input(capsys, files, tmp_path):
    rc, report = diff_json(capsys, files["base_ckpt"], files["base_sd"], "--keys", "base")
    assert rc == 0
    rc, _out, err = run(capsys, "diff", files["base_sd"], tmp_path / "missing.safetensors", "-q")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    rc, _out, err = run(capsys, "diff", files["base_sd"], files["base_sd"], "--keys", "sd15")
    assert rc == 2 and "--keys" in err


def test_diff_refiner_vs_base_is_different(capsys, files, tiny_refiner):
    rc, report = diff_json(capsys, tiny_refiner, files["refiner_sd"])
    assert rc == 0
    rc, report = diff_json(capsys, files["base_sd"], files["refiner_sd"])
    assert rc == 1 and report["only_in_a"] and report["only_in_b"]


def test_diff_copy_of_folder(capsys, tiny_base, tmp_path):
    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    rc, report = diff_json(capsys, tiny_base, copy)
    assert rc == 0 and report["compared"] == 2515
