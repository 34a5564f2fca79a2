"""The converted tiny ckpts reproduce diffusers stage by stage: fp32, CPU, 4 steps, CFG 5, rel L2 <= 1e-4, <= 1 level.

Cases: base with Euler and with DPM++(2M), the refiner (img2img), LCM with CFG (lcm-sdxl style) and LCM with the
guidance embedding (no CFG batch). Plus the reference's own properties: deterministic, and the same from an SD
single file as from the diffusers folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import verify_support as vs
from verify_support import BASE_SIZE, REFINER_SIZE, convert, reference

from sdxl_ckpt.cli import main
from sdxl_ckpt.formats.reference_npz import load_reference

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="session")
def base_case(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return vs.base_case(tiny_base, tmp_path_factory)


def verify_json(ckpt: Path, ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    rc = main(["verify", str(ckpt), "--reference", str(ref), "--quiet", "--json", str(report), *extra])
    out = capsys.readouterr().out
    assert ("PASS" in out) == (rc == 0), out
    return rc, json.loads(report.read_text())


def assert_all_within(report: dict, sampler: str, steps: int) -> None:
    assert report["passed"] and report["first_failure"] is None
    assert report["sampler"] == sampler and report["steps_run"] == steps
    names = [s["stage"] for s in report["stages"]]
    assert [f"step {i}/{steps}" for i in range(1, steps + 1)] == [n for n in names if n.startswith("step")]
    assert names[-4:] == ["final_latent", "vae.decode", "decoded", "image"] and "unet.first" in names and "y" in names
    for s in report["stages"]:
        assert s["rel_l2"] <= 1e-4 and s["cosine"] > 0.99999, s
    image = report["stages"][-1]
    assert image["levels_max"] <= 1 and image["psnr"] > 60, image


def test_base_euler(base_case, tmp_path, capsys):
    ckpt, ref = base_case
    rc, report = verify_json(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_all_within(report, "euler", 4)
    assert [s["stage"] for s in report["stages"]][:7] == [
        "schedule",
        "text_encoder_1",
        "text_encoder_2.hidden",
        "text_encoder_2.pooled",
        "context",
        "y",
        "unet.first",
    ]


def test_base_fp16_compute_on_cpu(base_case, tmp_path, capsys):
    """The half-precision path (weights and activations fp16, norms/softmax fp32, VAE fp32) against the fp32
    reference: within the fp16 defaults (rel L2 5e-2, 8 levels), and measurably not the fp32 path (error > 1e-4)."""
    ckpt, ref = base_case
    rc, report = verify_json(ckpt, ref, tmp_path, capsys, "--dtype", "fp16")
    assert rc == 0 and report["passed"]
    unet = next(s for s in report["stages"] if s["stage"] == "unet.first")
    assert 1e-4 < unet["rel_l2"] < 1e-2, unet
    assert report["stages"][-1]["levels_max"] <= 8


def test_base_dpmpp_2m(base_case, tiny_base, tmp_path, capsys):
    ckpt, _ = base_case
    ref = reference(tiny_base, tmp_path / "ref.npz", sampler="dpmpp_2m", **BASE_SIZE)
    rc, report = verify_json(ckpt, ref, tmp_path, capsys, "--sampler", "dpmpp_2m")
    assert rc == 0
    assert_all_within(report, "dpmpp_2m", 4)


def test_refiner_img2img(tiny_refiner, tmp_path_factory, tmp_path, capsys):
    out = tmp_path_factory.mktemp("refiner")
    ckpt = convert(tiny_refiner, out, "refiner")
    ref = reference(tiny_refiner, out / "ref.npz", steps=8, strength=0.5, **REFINER_SIZE)
    rc, report = verify_json(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_all_within(report, "euler", 4)
    names = [s["stage"] for s in report["stages"]]
    assert "text_encoder_1" not in names and "vae_encode" in names
    assert load_reference(ref)["timesteps"].tolist() == [499, 374, 249, 124]  # last 4 of the 8-step schedule


@pytest.mark.parametrize("cond_proj", [False, True], ids=["lcm-cfg", "lcm-w-embedding"])
def test_lcm(cond_proj, request, tmp_path_factory, tmp_path, capsys):
    folder = request.getfixturevalue("tiny_lcm_cond_proj" if cond_proj else "tiny_lcm")
    out = tmp_path_factory.mktemp("lcm")
    ckpt = convert(folder, out, "lcm", unet_dir=folder / "lcm-unet", lcm=True)
    ref = reference(folder, out / "ref.npz", sampler="lcm", unet=folder / "lcm-unet", **BASE_SIZE)
    rc, report = verify_json(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_all_within(report, "lcm", 4)
    data = load_reference(ref)
    assert data["timesteps"].tolist() == [999, 759, 499, 259]
    assert data["step_noise"].shape[0] == 3  # fresh noise between the 4 steps
    assert data["context"].shape[0] == (1 if cond_proj else 2)  # the w-embedding UNet runs without a CFG batch
    assert ("guidance_embedding" in [s["stage"] for s in report["stages"]]) == cond_proj
    if cond_proj:  # diffusers' from_single_file knows no SD name for cond_proj: the reference attaches it
        from_file = load_reference(reference(out / "lcm.safetensors", out / "ref_sd.npz", sampler="lcm", **BASE_SIZE))
        assert from_file.meta["variant"] == "lcm" and from_file.configs["unet"]["time_cond_proj_dim"] == 16
        for name in data.arrays:
            assert np.array_equal(from_file[name], data[name]), name


def test_reference_is_deterministic(base_case, tiny_base, tmp_path, capsys):
    _, first = base_case
    again = tmp_path / "again.npz"
    assert main(["reference", str(tiny_base), "-o", str(again), "--height", "32", "--width", "32", "--quiet"]) == 0
    a, b = load_reference(first), load_reference(again)
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert {k: v for k, v in a.meta.items() if k != "path"} == {k: v for k, v in b.meta.items() if k != "path"}
    assert main(["reference", str(tiny_base), "-o", str(again), "--quiet"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_reference_from_sd_file_equals_folder(base_case, tmp_path):
    """diffusers' from_single_file on our SD file (configs from its metadata) reproduces the folder's reference."""
    ckpt, ref = base_case
    sd_file = ckpt.with_suffix(".safetensors")
    from_file = reference(sd_file, tmp_path / "ref.npz", **BASE_SIZE)
    a, b = load_reference(ref), load_reference(from_file)
    assert b.meta["source"]["kind"] == "single_file" and b.meta["variant"] == "base"
    for name in a.arrays:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_verify_source_mode_runs_the_reference_in_process(tiny_base, tmp_path_factory, tmp_path, capsys):
    """--source computes the reference now (torch present); a ckpt of another seed fails at once."""
    other = vs.seed1_ckpt(tmp_path_factory)
    saved = tmp_path / "saved.npz"
    rc = main(
        [
            "verify",
            str(other),
            "--source",
            str(tiny_base),
            "--height",
            "32",
            "--width",
            "32",
            "--fail-fast",
            "--save-reference",
            str(saved),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "first failing stage: text_encoder_1" in out
    assert load_reference(saved).settings["height"] == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "lcm"], "reference was made with --sampler euler"),
        (["--source", "x"], "exactly one of --reference"),
        (["--rtol-override", "step"], "STAGE=VALUE"),
        (["--dtype", "fp64"], "dtype"),
        (["--reference", "missing.npz"], "reference file not found"),
    ],
)
def test_verify_refuses_bad_arguments(args, message, base_case, capsys):
    ckpt, ref = base_case
    assert main(["verify", str(ckpt), "--reference", str(ref), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err


def test_demo_runs_the_whole_chain(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    for step in ("[1/5] tiny-model", "[2/5] diffusers-to-sd", "[3/5] st-to-ms", "[4/5] reference", "[5/5] verify"):
        assert step in out
    assert "demo PASS" in out and (tmp_path / "sdxl-base.ckpt").is_file() and (tmp_path / "ref-base.npz").is_file()


def test_verify_refuses_a_ckpt_of_another_variant(base_case, tiny_refiner, tmp_path, capsys):
    ckpt, _ = base_case
    ref = reference(tiny_refiner, tmp_path / "ref.npz", steps=2, strength=1.0, **REFINER_SIZE)
    assert main(["verify", str(ckpt), "--reference", str(ref), "--quiet"]) == 2
    assert "does not fit the refiner model" in capsys.readouterr().err


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    calls = [0]
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_isolating_stages_share_the_chain_on_a_passing_run(base_case, tmp_path, capsys, monkeypatch):
    """unet.first and vae.decode take the chain's own evaluation and decode when every earlier stage passed: a
    4-step Euler run evaluates the UNet 4 times (not 5) and decodes once (not twice), and the report says so."""
    from sdxl_ckpt.sdxl_runtime.api import SDXLRuntime

    unet_calls = _count_calls(monkeypatch, SDXLRuntime, "unet")
    decode_calls = _count_calls(monkeypatch, SDXLRuntime, "decode")
    ckpt, ref = base_case
    rc, report = verify_json(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_all_within(report, "euler", 4)
    assert (unet_calls[0], decode_calls[0]) == (4, 1)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["unet.first"]["note"] == "the chain's first evaluation, on our conditioning"
    assert stages["vae.decode"]["note"] == "our final latent decoded"
    assert stages["vae.decode"]["rel_l2"] == stages["decoded"]["rel_l2"]


def test_a_shared_result_that_fails_is_judged_again_on_the_reference_inputs(base_case, tmp_path, capsys, monkeypatch):
    """A chain whose first evaluation is off (as a sampler fault would make it) does not blame the UNet: unet.first
    is computed again on the reference's own inputs, and that verdict (a pass) is the stage's."""
    from sdxl_ckpt.verify import verify

    real = verify.Session.chain_first_unet
    monkeypatch.setattr(verify.Session, "chain_first_unet", property(lambda ss: real.fget(ss) * np.float32(1.01)))
    ckpt, ref = base_case
    rc, report = verify_json(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    unet = next(s for s in report["stages"] if s["stage"] == "unet.first")
    assert unet["ok"] == "ok" and unet["note"] == "" and unet["rel_l2"] < 1e-4
