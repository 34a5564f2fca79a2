"""reference + verify on every variant row whose schedule, prediction or proportions differ: tiny models, CLI only.

Each row: diffusers folder -> diffusers-to-sd -> st-to-ms -> reference -> verify PASS (fp32, every stage within
rel L2 1e-4) -> ms-to-st, bit for bit the SD file again. Rows: the distilled depths (SSD-1B, Vega), odd
proportions (channels 32/96/64, a 100-wide time embedding, 1/3/2 heads; a conv-projection refiner), v-prediction
with zero terminal SNR (and without it, from the SD file alone), Playground v2.5 (EDM, VAE latents mean/std,
scaling 0.5) and EDM v-prediction. Negative checks: a reference sampled another way than the ckpt's markers say
fails at ``schedule``; a reference that lies about the prediction type fails at the first step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from verify_support import BASE_SIZE, REFINER_SIZE

from sdxl_ckpt.cli import main
from sdxl_ckpt.formats.reference_npz import load_reference, save_reference

pytestmark = [pytest.mark.torch, pytest.mark.slow]

STEPS = 2
SIZES = {"odd-refiner": REFINER_SIZE}


def _run(*args: object) -> None:
    rc = main([str(a) for a in args] + ["--quiet"])
    assert rc == 0, args


class Chain:
    """One tiny row converted: folder, SD file, ckpt; references by name (built once per module)."""

    def __init__(self, root: Path, name: str) -> None:
        from sdxl_ckpt.testmodels.tiny import build_shape_model

        self.name, self.root = name, root
        self.folder = build_shape_model(name, root / "pipe")
        self.sd, self.ckpt = root / f"{name}.safetensors", root / f"{name}.ckpt"
        _run("diffusers-to-sd", self.folder, "-o", self.sd)
        _run("st-to-ms", self.sd, "-o", self.ckpt)

    def reference(self, src: Path, tag: str, *extra: object, steps: int = STEPS) -> Path:
        out = self.root / f"ref-{tag}.npz"
        if not out.exists():
            size = SIZES.get(self.name, BASE_SIZE)
            run = ("--steps", 2 * steps, "--strength", 0.5) if self.name == "odd-refiner" else ("--steps", steps)
            _run("reference", src, "-o", out, *run, "--height", size["height"], "--width", size["width"], *extra)
        return out


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, Chain] = {}

    def get(name: str) -> Chain:
        if name not in built:
            built[name] = Chain(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


def verify(ckpt: Path, ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict]:
    report = tmp_path / f"report-{ckpt.stem}-{ref.stem}.json"
    rc = main(["verify", str(ckpt), "--reference", str(ref), "--quiet", "--json", str(report), *extra])
    out = capsys.readouterr().out
    assert ("PASS" in out) == (rc == 0), out
    return rc, json.loads(report.read_text())


def assert_passes(report: dict, steps: int = STEPS, floor: float | None = None) -> None:
    """Every stage within 1e-4 relative L2; ``floor``: the chain stages within verify's float32 floor instead
    (zero terminal SNR: the first step cancels a sample of magnitude ~4096)."""
    assert report["passed"], report["first_failure"]
    names = [s["stage"] for s in report["stages"]]
    assert names[0] == "schedule" and names[-4:] == ["final_latent", "vae.decode", "decoded", "image"]
    assert [n for n in names if n.startswith("step")] == [f"step {i}/{steps}" for i in range(1, steps + 1)]
    chain = set(report["tolerances"]["chain_floor"])
    assert (floor is not None) == bool(chain)
    for stage in report["stages"]:
        in_chain = stage["stage"].split(" ")[0] in chain
        assert stage["rel_l2"] <= (floor if in_chain and floor else 1e-4), stage
    assert report["stages"][-1]["levels_max"] <= 1


def assert_round_trip(chain: Chain, tmp_path: Path, ckpt: Path | None = None, sd: Path | None = None) -> None:
    back = tmp_path / f"back-{chain.name}.safetensors"
    _run("ms-to-st", ckpt or chain.ckpt, "-o", back, "--overwrite")
    a, b = load_file(sd or chain.sd), load_file(back)
    assert list(a) and set(a) == set(b)
    for key, array in a.items():
        assert b[key].dtype == array.dtype and b[key].tobytes() == array.tobytes(), key


def strip(src: Path, out: Path, drop: tuple[str, ...] = (), metadata: bool = True) -> Path:
    """A copy of an SD file without the tensors ``drop`` and the variant label (with metadata=False, without any
    metadata)."""
    with safe_open(str(src), "np") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k != "sdxl_ckpt.variant"} if metadata else None
    tensors = {k: v for k, v in load_file(src).items() if k not in drop}
    save_file(tensors, out, metadata=meta)
    return out


# --- distilled and odd proportions --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ssd-1b", "vega", "odd", "odd-refiner"])
def test_distilled_and_odd_proportions(chains, name, tmp_path, capsys):
    chain = chains(name)
    rc, report = verify(chain.ckpt, chain.reference(chain.folder, "folder"), tmp_path, capsys)
    assert rc == 0
    assert_passes(report)
    assert report["variant"] == {"ssd-1b": "ssd-1b", "vega": "vega", "odd": "distilled"}.get(name, "refiner")
    assert_round_trip(chain, tmp_path)


def test_community_file_without_metadata(chains, tmp_path, capsys):
    """An SD file with its sdxl_ckpt.* metadata stripped converts to a ckpt that verifies against the folder's
    reference (the ckpt's head counts come from the reference's configs, not from the 64-channel convention)."""
    chain = chains("odd")
    community = strip(chain.sd, tmp_path / "community.safetensors", metadata=False)
    ckpt = tmp_path / "community.ckpt"
    _run("st-to-ms", community, "-o", ckpt)
    rc, report = verify(ckpt, chain.reference(chain.folder, "folder"), tmp_path, capsys)
    assert rc == 0
    assert_passes(report)
    assert_round_trip(chain, tmp_path, ckpt=ckpt, sd=community)


# --- v-prediction ---------------------------------------------------------------------------------------------------


def test_v_prediction_zero_terminal_snr(chains, tmp_path, capsys):
    chain = chains("v-pred")
    ref = chain.reference(chain.folder, "folder")
    meta = load_reference(ref).meta
    assert meta["variant"] == "v-pred" and meta["schedule"]["scheduler"] == "EulerDiscreteScheduler"
    assert meta["schedule"]["prediction_type"] == "v_prediction" and meta["schedule"]["rescale_betas_zero_snr"]
    sigmas = load_reference(ref)["sigmas"]
    assert 4095 < sigmas[0] < 4097  # abar_999 = 2**-24
    rc, report = verify(chain.ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_passes(report, floor=1e-3)
    assert report["tolerances"]["chain_floor"]["step"] == 0.00098  # 4 * 2**-24 * 4096
    assert report["checkpoint_markers"] == ["v_pred", "ztsnr"]
    # the SD file alone (no --config): the scheduler comes from its marker tensors
    from_file = chain.reference(chain.sd, "file")
    a, b = load_reference(ref), load_reference(from_file)
    assert b.meta["schedule"] == {**a.meta["schedule"]} and b.meta["source"]["kind"] == "single_file"
    for key in a.arrays:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert_round_trip(chain, tmp_path)


def test_v_prediction_dpmpp_2m(chains, tmp_path, capsys):
    chain = chains("v-pred")
    ref = chain.reference(chain.folder, "dpm", "--sampler", "dpmpp_2m", steps=3)  # step 2 is second order
    assert load_reference(ref).meta["schedule"]["scheduler"] == "DPMSolverMultistepScheduler"
    rc, report = verify(chain.ckpt, ref, tmp_path, capsys, "--sampler", "dpmpp_2m")
    assert rc == 0
    assert_passes(report, steps=3)  # DPM-Solver cancels nothing: no float32 floor, every stage within 1e-4


def test_v_prediction_without_ztsnr_and_the_negative_checks(chains, tmp_path, capsys):
    chain = chains("v-pred")
    plain = strip(chain.sd, chain.root / "vpred-plain.safetensors", drop=("ztsnr",))
    ckpt = chain.root / "vpred-plain.ckpt"
    _run("st-to-ms", plain, "-o", ckpt, "--overwrite")
    ref = chain.reference(plain, "plain")
    meta = load_reference(ref).meta
    assert meta["schedule"]["prediction_type"] == "v_prediction" and not meta["schedule"]["rescale_betas_zero_snr"]
    rc, report = verify(ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_passes(report)
    assert_round_trip(chain, tmp_path, ckpt=ckpt, sd=plain)

    # the zero-SNR ckpt against the plain v-prediction reference: our sigmas follow the reference's record, but
    # the ckpt's markers say it was trained on another schedule
    rc, report = verify(chain.ckpt, ref, tmp_path, capsys, "--fail-fast")
    assert rc == 1 and report["first_failure"] == "schedule" and report["stages"][0]["rel_l2"] < 1e-6
    assert "zero terminal SNR: checkpoint markers say True" in report["stages"][0]["note"]

    # an eps reference (the markers removed from the SD file) proves nothing about the v-prediction ckpt
    eps = strip(chain.sd, chain.root / "vpred-eps.safetensors", drop=("v_pred", "ztsnr"))
    eps_ref = chain.reference(eps, "eps")
    assert load_reference(eps_ref).meta["schedule"]["prediction_type"] == "epsilon"
    rc, report = verify(ckpt, eps_ref, tmp_path, capsys, "--fail-fast")
    assert rc == 1 and report["first_failure"] == "schedule" and len(report["stages"]) == 1
    assert (
        "prediction_type: checkpoint markers say v_prediction, the reference ran epsilon"
        in (report["stages"][0]["note"])
    )

    # a reference that records eps for what diffusers ran as v: our sampler follows it, and the first step fails
    data = load_reference(ref)
    data.meta["schedule"]["prediction_type"] = "epsilon"
    lying = save_reference(tmp_path / "lying.npz", data, overwrite=True)
    rc, report = verify(ckpt, lying, tmp_path, capsys)
    stages = {s["stage"]: s for s in report["stages"]}
    assert (
        "prediction_type: checkpoint markers say v_prediction, the reference ran epsilon" in stages["schedule"]["note"]
    )
    assert rc == 1 and stages["unet.first"]["ok"] == "ok" and stages[f"step 1/{STEPS}"]["ok"] == "FAIL"
    assert stages[f"step 1/{STEPS}"]["rel_l2"] > 1e-2


# --- EDM ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_playground_edm(chains, sampler, tmp_path, capsys):
    chain = chains("playground-v2.5")
    steps = 3 if sampler == "dpmpp_2m" else STEPS  # DPM++(2M): step 2 is second order
    ref = chain.reference(chain.folder, sampler, "--sampler", sampler, steps=steps)
    data = load_reference(ref)
    assert data.meta["variant"] == "playground-v2.5"
    sched = data.meta["schedule"]
    assert sched["kind"] == "edm" and sched["sigma_data"] == 0.5 and sched["sigma_max"] == 80.0
    assert sched["scheduler"] == {"euler": "EDMEulerScheduler", "dpmpp_2m": "EDMDPMSolverMultistepScheduler"}[sampler]
    assert data.meta["latents"]["scaling_factor"] == 0.5 and len(data.meta["latents"]["mean"]) == 4
    assert data["timesteps"].dtype == np.float32  # c_noise = ln(sigma) / 4
    np.testing.assert_allclose(data["timesteps"][0], 0.25 * np.log(80.0), rtol=1e-6)
    rc, report = verify(chain.ckpt, ref, tmp_path, capsys, "--sampler", sampler)
    assert rc == 0
    assert_passes(report, steps=steps)
    if sampler == "euler":
        assert_round_trip(chain, tmp_path)
        # an SD file with no metadata, no --config: EDM and the latent statistics come from its edm_mean / edm_std
        # tensors (its head counts from the 64-channel convention: another model than the folder's, same weights)
        community = strip(chain.sd, chain.root / "pg-community.safetensors", metadata=False)
        c_ref = chain.reference(community, "community")
        from_file = load_reference(c_ref)
        assert from_file.meta["variant"] == "playground-v2.5" and from_file.meta["schedule"]["kind"] == "edm"
        for key in ("mean", "std"):
            np.testing.assert_allclose(from_file.meta["latents"][key], data.meta["latents"][key], rtol=1e-6)
        rc, report = verify(chain.ckpt, c_ref, tmp_path, capsys)
        assert rc == 0
        assert_passes(report)


def test_v_prediction_edm(chains, tmp_path, capsys):
    chain = chains("v-pred-edm")
    ref = chain.reference(chain.folder, "folder")
    sched = load_reference(ref).meta["schedule"]
    assert sched["kind"] == "edm" and sched["prediction_type"] == "v_prediction" and sched["sigma_max"] == 120.0
    rc, report = verify(chain.ckpt, ref, tmp_path, capsys)
    assert rc == 0
    assert_passes(report)
    assert report["checkpoint_markers"] == ["edm_vpred.sigma_max", "edm_vpred.sigma_min"]
    assert_round_trip(chain, tmp_path)
    # the SD file alone: EDMEulerScheduler with the sigmas its edm_vpred.* tensors carry
    a, b = load_reference(ref), load_reference(chain.reference(chain.sd, "file"))
    assert b.meta["variant"] == "v-pred-edm"
    for key, value in a.meta["schedule"].items():  # the sigmas come back as the markers' float32 values
        assert b.meta["schedule"][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)
    for key in a.arrays:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
