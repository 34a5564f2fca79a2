"""verify must FAIL (exit 1) on planted conversion faults and name the stage where the fault lives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import verify_support as vs
from verify_support import BASE_SIZE, convert, plant, reference, square_projection_model, swap

from sdxl_ckpt.cli import main

pytestmark = [pytest.mark.torch, pytest.mark.slow]

UNET = "model.diffusion_model."
BLOCK = UNET + "input_blocks.4.1.transformer_blocks.0."  # first transformer block of the second level
VAE_CONV = "first_stage_model.decoder.up.3.upsample.conv.weight"  # diffusers' decoder.up_blocks.0.upsamplers.0


@pytest.fixture(scope="session")
def base_case(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return vs.base_case(tiny_base, tmp_path_factory)


def run_verify(ckpt: Path, ref: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    rc = main(["verify", str(ckpt), "--reference", str(ref), "--fail-fast", "--quiet", "--json", str(report)])
    out = capsys.readouterr().out
    return rc, json.loads(report.read_text()), out


def assert_fails_at(rc: int, report: dict, out: str, stage: str) -> None:
    assert rc == 1, out
    assert report["passed"] is False and report["first_failure"] == stage, out
    names = [s["stage"] for s in report["stages"]]
    assert names[-1] == stage  # --fail-fast: nothing computed after it
    assert all(s["ok"] == "ok" for s in report["stages"][:-1]), out  # everything before it is still exact
    assert f"first failing stage: {stage}" in out


FAULTS = {
    "attn1 to_q/to_k swapped": (swap(BLOCK + "attn1.to_q.weight", BLOCK + "attn1.to_k.weight"), "unet.first"),
    "GroupNorm gamma/beta swapped": (
        swap(UNET + "input_blocks.1.0.in_layers.0.gamma", UNET + "input_blocks.1.0.in_layers.0.beta"),
        "unet.first",
    ),
    # a conv whose output feeds a GroupNorm directly is all but scale-invariant: the upsampler's is not
    "VAE decoder conv x1.01": ({VAE_CONV: lambda by: by[VAE_CONV].load() * np.float32(1.01)}, "vae.decode"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_is_named(fault, base_case, tmp_path, capsys):
    ckpt, ref = base_case
    edits, stage = FAULTS[fault]
    bad = plant(ckpt, tmp_path / "bad.ckpt", edits)
    assert_fails_at(*run_verify(bad, ref, tmp_path, capsys), stage)


def test_ckpt_of_another_seed_fails_at_the_first_encoder(base_case, tmp_path_factory, tmp_path, capsys):
    _, ref = base_case
    assert_fails_at(*run_verify(vs.seed1_ckpt(tmp_path_factory), ref, tmp_path, capsys), "text_encoder_1")


def test_untransposed_square_text_projection_fails_at_pooled(tiny_base, tmp_path_factory, tmp_path, capsys):
    """At full size the OpenCLIP projection is square, so forgetting its transpose loads fine: verify must catch it."""
    out = tmp_path_factory.mktemp("square")
    folder = square_projection_model(tiny_base, out / "pipe")
    ckpt = convert(folder, out, "square")
    ref = reference(folder, out / "ref.npz", **BASE_SIZE)
    key = "conditioner.embedders.1.model.text_projection"
    bad = plant(ckpt, tmp_path / "bad.ckpt", {key: lambda by: np.ascontiguousarray(by[key].load().T)})
    rc, report, text = run_verify(bad, ref, tmp_path, capsys)
    assert_fails_at(rc, report, text, "text_encoder_2.pooled")
    assert report["stages"][-2]["stage"] == "text_encoder_2.hidden"  # the hidden states were right
