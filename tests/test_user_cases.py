"""A new user's mistakes, each through the real CLI (``python -m sdxl_ckpt.cli`` in a subprocess).

Each case checks the exit code (README "Exit codes"), the one ``error:`` line (what the file is, which command
takes it), no traceback, and that every input file is byte-for-byte unchanged (sha256 before and after).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_hardening import SLOW_READS, assert_one_error

pytestmark = pytest.mark.slow  # ~40 subprocess runs of the CLI
UNET = "model.diffusion_model."
OVERFLOW_KEY = f"{UNET}out.2.bias"


def cli(*argv: object, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sdxl_ckpt.cli", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)


def digests(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file (folders: every file below them), by path."""
    out: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def refused(argv: list[object], inputs: list[Path], code: int, *needles: str) -> str:
    """Run ``argv``: exit ``code``, one error line with every needle, inputs unchanged; returns the line."""
    before = digests(inputs)
    proc = cli(*argv, "-q")
    assert proc.returncode == code, (argv, proc.returncode, proc.stderr)
    assert_one_error(proc.stderr, *needles)
    assert digests(inputs) == before, argv
    return proc.stderr.strip()


@pytest.fixture(scope="module")
def files(tiny_base: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny base as SD safetensors and ckpt, plus the wrong-kind files a user may hand over."""
    d = tmp_path_factory.mktemp("user_cases")
    sd, ckpt = d / "base.safetensors", d / "base.ckpt"
    assert cli("diffusers-to-sd", tiny_base, "-o", sd, "-q").returncode == 0
    assert cli("st-to-ms", sd, "-o", ckpt, "-q").returncode == 0
    tensors = load_file(sd)
    out = {"sd": sd, "ckpt": ckpt, "dir": d}
    out["unet_only"] = d / "unet_only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith(UNET)}, out["unet_only"])
    out["kohya"] = d / "kohya.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 8), np.float32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((8, 4), np.float32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(4.0, np.float32),
        },
        out["kohya"],
    )
    out["peft"] = d / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.zeros((4, 8), np.float32)}, out["peft"])
    out["old_lora"] = d / "old_lora.safetensors"
    save_file(
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": np.zeros((4, 8))},
        out["old_lora"],
    )
    out["empty"] = d / "empty.ckpt"
    out["empty"].write_bytes(b"")
    out["zip_pickle"] = d / "torch.ckpt"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # torch.save's layout: archive/data.pkl + archive/data/0 ...
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}, protocol=2))
        archive.writestr("archive/version", "3\n")
    out["zip_pickle"].write_bytes(buffer.getvalue())
    out["legacy_pickle"] = d / "legacy.ckpt"
    out["legacy_pickle"].write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    out["big"] = d / "big.safetensors"
    big = dict(tensors)
    big[OVERFLOW_KEY] = big[OVERFLOW_KEY].copy()
    big[OVERFLOW_KEY][:2] = 1e6  # finite in fp32, beyond fp16's 65504
    save_file(big, out["big"], metadata={"sdxl_ckpt.variant": "base"})
    return out


# --- an output never replaces an input ----------------------------------------------------------------------------


def test_output_equal_to_the_input_is_refused_even_with_overwrite(files, tiny_base, tmp_path):
    sd, ckpt = files["sd"], files["ckpt"]
    refused(["st-to-ms", sd, "-o", sd, "--overwrite"], [sd], 2, "is the input file", "--overwrite never")
    refused(["ms-to-st", ckpt, "-o", ckpt, "--overwrite"], [ckpt], 2, "ms-to-st writes safetensors")
    ms_st = tmp_path / "ms.safetensors"
    assert cli("st-to-ms", sd, "-o", ms_st, "-q").returncode == 0
    refused(["ms-to-st", ms_st, "-o", ms_st, "--overwrite"], [ms_st], 2, "is the input file")
    # the same file under another name: a hard link (same inode) and a symbolic link (same real path)
    hard, soft = tmp_path / "hard.safetensors", tmp_path / "soft.safetensors"
    os.link(sd, hard)
    soft.symlink_to(sd)
    for alias in (hard, soft):
        refused(["st-to-ms", sd, "-o", alias, "--overwrite"], [sd], 2, "is the input file")
        refused(["st-to-ms", alias, "-o", sd, "--overwrite"], [sd], 2, "is the input file")


def test_json_report_never_replaces_an_input_or_the_output(files, tmp_path):
    sd, ckpt = files["sd"], files["ckpt"]
    refused(["st-to-ms", sd, "-o", tmp_path / "o.ckpt", "--json", sd], [sd], 2, "--json names")
    refused(["ms-to-st", ckpt, "-o", tmp_path / "o.safetensors", "--json", ckpt], [ckpt], 2, "--json names")
    refused(["inspect", sd, "--json", sd], [sd], 2, "--json names")
    refused(["diff", sd, ckpt, "--json", ckpt], [sd, ckpt], 2, "--json names")
    hard = tmp_path / "hard.safetensors"
    os.link(sd, hard)  # another name for the input: caught by its inode
    refused(["inspect", sd, "--json", hard], [sd], 2, "is the input file")
    out = tmp_path / "o.ckpt"
    refused(["st-to-ms", sd, "-o", out, "--json", out], [sd], 2, "--json names")
    assert not out.exists()


def test_output_inside_an_input_folder_is_refused(files, tiny_base, tmp_path):
    pipe = tmp_path / "G"
    assert cli("tiny-model", "--model", "base", "-o", pipe, "-q").returncode == 0
    unet_file = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    line = refused(["diffusers-to-sd", pipe, "-o", unet_file, "--overwrite"], [pipe], 2, "input")
    assert "inside the input folder" in line or "is the input file" in line
    refused(["diffusers-to-sd", pipe, "-o", pipe / "new.safetensors"], [pipe], 2, "inside the input folder")
    refused(["diffusers-to-sd", tiny_base, "--vae", pipe / "vae", "-o", pipe / "vae" / "x.safetensors"], [pipe], 2)
    refused(["reference", pipe, "-o", pipe / "ref.npz"], [pipe], 2, "inside the input folder")
    proc = cli("inspect", pipe, "-q")
    assert proc.returncode == 0 and "unet          1680" in proc.stdout


# --- the output format follows the extension ----------------------------------------------------------------------


def test_output_format_follows_the_extension(files, tiny_base, tmp_path):
    sd = files["sd"]
    ms_st = tmp_path / "out.safetensors"
    before = digests([sd])
    proc = cli("st-to-ms", sd, "-o", ms_st, "-q")
    assert proc.returncode == 0, proc.stderr
    assert digests([sd]) == before
    proc = cli("inspect", ms_st, "-q")
    assert proc.returncode == 0 and "MindSpore-named safetensors" in proc.stdout
    assert cli("ms-to-st", ms_st, "-o", tmp_path / "back.safetensors", "-q").returncode == 0
    refused(["st-to-ms", sd, "-o", tmp_path / "x.safetensors", "--format", "ckpt"], [sd], 2, "contradicts")
    refused(["st-to-ms", sd, "-o", tmp_path / "x.ckpt", "--format", "safetensors"], [sd], 2, "contradicts")
    refused(["ms-to-st", files["ckpt"], "-o", tmp_path / "x.ckpt"], [files["ckpt"]], 2, "writes safetensors")
    refused(["diffusers-to-sd", tiny_base, "-o", tmp_path / "x.ckpt"], [tiny_base], 2, "writes safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "out.safetensors"]


# --- every command says what a wrong file is and which command takes it --------------------------------------------


def test_a_pytorch_pickle_is_named_by_every_command(files, tmp_path):
    for name in ("zip_pickle", "legacy_pickle"):
        bad = files[name]
        for argv in (
            ["st-to-ms", bad, "-o", tmp_path / "o.ckpt"],
            ["ms-to-st", bad, "-o", tmp_path / "o.safetensors"],
            ["inspect", bad],
            ["diff", files["sd"], bad],
            ["verify", bad, "--reference", tmp_path / "none.npz"],
        ):
            refused(argv, [bad], 2, "PyTorch pickle", "never unpickled")
    assert not list(tmp_path.iterdir())


def test_an_sd_file_given_to_ms_to_st_points_to_st_to_ms(files, tmp_path):
    line = refused(
        ["ms-to-st", files["sd"], "-o", tmp_path / "o.safetensors"], [files["sd"]], 2, "SD safetensors", "`st-to-ms`"
    )
    assert "did you mean" not in line and len(line) < 300
    refused(["st-to-ms", files["ckpt"], "-o", tmp_path / "o.ckpt"], [files["ckpt"]], 2, "MindSpore ckpt", "`ms-to-st`")


def test_an_empty_file_is_called_empty(files, tmp_path):
    empty = files["empty"]
    for argv in (
        ["inspect", empty],
        ["st-to-ms", empty, "-o", tmp_path / "o.ckpt"],
        ["ms-to-st", empty, "-o", tmp_path / "o.safetensors"],
        ["diff", files["ckpt"], empty],
        ["verify", empty, "--reference", tmp_path / "none.npz"],
    ):
        refused(argv, [empty], 2, "empty file")


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("kohya", ("kohya LoRA", "sdxl-ckpt lora")),
        ("peft", ("PEFT", "sdxl-ckpt lora")),
        ("old_lora", ("attention-processor LoRA", "sdxl-ckpt lora")),
        ("unet_only", ("partial", "only unet 1680 tensors", "no vae")),
    ],
)
def test_a_lora_or_partial_file_given_to_st_to_ms(files, tmp_path, name, needles):
    line = refused(["st-to-ms", files[name], "-o", tmp_path / "o.ckpt"], [files[name]], 2, *needles)
    assert "--keys" not in line
    refused(["st-to-ms", files[name], "-o", tmp_path / "o.ckpt", "--keys", "base"], [files[name]], 2, *needles)
    if name != "unet_only":
        refused(["inspect", files[name]], [files[name]], 2, "sdxl-ckpt lora")


# --- messages -----------------------------------------------------------------------------------------------------


def test_fp16_overflow_is_named_as_the_casts_doing(files, tmp_path):
    before = digests([files["big"]])
    proc = cli("st-to-ms", files["big"], "-o", tmp_path / "half.ckpt", "--dtype", "fp16", "-q")
    assert proc.returncode == 0, proc.stderr
    assert digests([files["big"]]) == before
    assert "RuntimeWarning" not in proc.stderr and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"warning: --dtype fp16 overflowed 2 values in {OVERFLOW_KEY!r} (finite in the source, Inf in the output)"
    ], proc.stderr


def test_long_problem_lists_show_a_count_and_the_json_has_all(files, tmp_path):
    report = tmp_path / "problems.json"
    renamed = tmp_path / "renamed.safetensors"  # every UNet output-block bias saved under another name
    save_file(
        {
            (k + "_old" if k.startswith("model.diffusion_model.output_blocks") and k.endswith(".bias") else k): v
            for k, v in load_file(files["sd"]).items()
        },
        renamed,
    )
    before = digests([renamed])
    argv = ["st-to-ms", renamed, "-o", tmp_path / "o.ckpt", "--json", report, "-q"]
    proc = cli(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "problems (" in lines[0], lines[0]
    total = int(lines[0].split(": ")[2].split()[0])
    assert [x.startswith("  key ") for x in lines[1:]] == [True] * 10 + [False]
    assert lines[-1] == f"  ... and {total - 10} more (--json FILE lists them all)"
    assert total > 100 and len(json.loads(report.read_text())["problems"]) == total
    assert digests([renamed]) == before and not (tmp_path / "o.ckpt").exists()


def test_unknown_stage_and_sampler_names_are_errors(files, tmp_path):
    ckpt = files["ckpt"]
    refused(["verify", ckpt, "--reference", tmp_path / "r.npz", "--rtol-override", "foo=1e-3"], [ckpt], 2, "no stage")
    refused(["verify", ckpt, "--reference", tmp_path / "r.npz", "--rtol-override", "unet.frist=1"], [ckpt], 2, "unet")
    line = refused(
        ["verify", ckpt, "--reference", tmp_path / "r.npz", "--sampler", "euler_a"], [ckpt], 2, "no diffusers reference"
    )
    assert "make a euler_a reference" not in line
    refused(
        ["reference", files["sd"], "-o", tmp_path / "r.npz", "--sampler", "euler_a"],
        [files["sd"]],
        2,
        "no diffusers reference",
    )
    # accepted spellings pass the name checks and stop at the missing reference instead
    refused(
        ["verify", ckpt, "--reference", tmp_path / "r.npz", "--sampler", "Euler", "--rtol-override", "step=1e-3"],
        [ckpt],
        2,
        "reference file not found",
    )


def test_stage_names_accepted_by_rtol_override_cover_every_stage():
    from sdxl_ckpt.formats.reference_npz import Reference
    from sdxl_ckpt.verify.verify import check_override_names, resolve_sampler, stages_for

    arrays = {"timesteps": np.zeros(3), "init_latent": np.zeros(1)}  # init_latent: inpainting below strength 1
    for variant in ("base", "inpaint", "pix2pix"):
        for refiner in (False, True):
            for cond_proj in (False, True):
                ref = Reference(arrays, {"variant": variant})
                names = [s.name for s in stages_for(ref, refiner, cond_proj)]
                check_override_names(dict.fromkeys(names, 1.0))
    assert resolve_sampler("DPMPP_2M") == "dpmpp_2m" and resolve_sampler("dpmpp-2m") == "dpmpp_2m"


def test_inspect_hash_mismatch_exits_1_and_converters_say_they_did_not_check(files, tmp_path):
    tensors = load_file(files["sd"])
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file(tensors, good, metadata={"sdxl_ckpt.variant": "base"})
    raw = good.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    content = "0x" + hashlib.sha256(raw[8 + header_len :]).hexdigest()
    save_file(tensors, good, metadata={"sdxl_ckpt.variant": "base", "modelspec.hash_sha256": content})
    save_file(tensors, bad, metadata={"sdxl_ckpt.variant": "base", "modelspec.hash_sha256": "0x" + "0" * 64})
    before = digests([good, bad])
    ok = cli("inspect", good, "--hash", "-q")
    assert ok.returncode == 0 and "matches" in ok.stdout, ok.stdout + ok.stderr
    mismatch = cli("inspect", bad, "--hash", "-q")
    assert mismatch.returncode == 1 and "MISMATCH" in mismatch.stdout
    assert "does not match its modelspec.hash_sha256" in mismatch.stderr and "Traceback" not in mismatch.stderr
    converted = cli("st-to-ms", bad, "-o", tmp_path / "bad.ckpt", "-q")
    assert converted.returncode == 0
    assert "modelspec.hash_sha256 (0x0000" in converted.stdout and "was not checked" in converted.stdout
    assert digests([good, bad]) == before


# --- signals and leftovers ----------------------------------------------------------------------------------------


def _slow_run(tmp_path: Path, argv: list[object]) -> tuple[subprocess.Popen, Path]:
    """Start the CLI with slowed tensor reads; return once its hidden partial output exists."""
    driver, marker = tmp_path / "driver.py", tmp_path / "reading"
    driver.write_text(SLOW_READS)
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(marker), *map(str, argv), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out_dir = Path(argv[argv.index("-o") + 1]).parent
    deadline = time.monotonic() + 120
    while not (marker.exists() and any(p.name.endswith(".partial") for p in out_dir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(0.2)
    assert proc.poll() is None
    return proc, out_dir


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_stop_signals_remove_the_partial_output(files, tmp_path, signum, code):
    out = tmp_path / "out" / "x.ckpt"
    out.parent.mkdir()
    before = digests([files["sd"]])
    proc, out_dir = _slow_run(tmp_path, ["st-to-ms", files["sd"], "-o", out])
    try:
        proc.send_signal(signum)
        _stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert_one_error(err, "interrupted", "no output was written")
    assert list(out_dir.iterdir()) == []
    assert digests([files["sd"]]) == before


def test_sigkill_leftover_is_removed_by_the_next_run(files, tmp_path):
    out = tmp_path / "out" / "x.ckpt"
    out.parent.mkdir()
    proc, out_dir = _slow_run(tmp_path, ["st-to-ms", files["sd"], "-o", out])
    proc.kill()  # SIGKILL: no handler runs, as in a power loss
    proc.communicate(timeout=60)
    leftovers = [p.name for p in out_dir.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".x.ckpt.") and leftovers[0].endswith(".partial")
    again = cli("st-to-ms", files["sd"], "-o", out, "-q")
    assert again.returncode == 0, again.stderr
    assert f"note: removed {out_dir / leftovers[0]}" in again.stderr and "interrupted earlier run" in again.stderr
    assert [p.name for p in out_dir.iterdir()] == ["x.ckpt"]


def _wait_for_partial_folder(proc: subprocess.Popen, parent: Path, name: str) -> Path:
    deadline = time.monotonic() + 120
    while True:
        found = [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".partial")]
        if found and any(found[0].rglob("*.safetensors")):
            return found[0]
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_tiny_model_leaves_no_folder_and_a_rerun_works(tmp_path, how):
    target = tmp_path / "pipe"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_ckpt.cli", "tiny-model", "--model", "base", "-o", str(target), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for_partial_folder(proc, tmp_path, "pipe")
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert not target.exists()
    if how == "sigint":
        assert proc.returncode == 130
        assert_one_error(err, "interrupted", "no output was written")
        assert list(tmp_path.iterdir()) == []
    again = cli("tiny-model", "--model", "base", "-o", target, "-q")
    assert again.returncode == 0, again.stderr
    assert (how == "sigkill") == ("interrupted earlier run" in again.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"] and (target / "model_index.json").is_file()
    assert cli("tiny-model", "--model", "base", "-o", target, "-q", "--overwrite").returncode == 0


# --- the reference side (torch): refiner without --height, base ckpt against a refiner reference --------------------


@pytest.mark.torch
@pytest.mark.slow
def test_refiner_reference_without_height_and_a_mismatched_verify(files, tiny_refiner, tmp_path):
    pytest.importorskip("diffusers")
    ref = tmp_path / "refiner.npz"
    before = digests([tiny_refiner, files["ckpt"]])
    proc = cli("reference", tiny_refiner, "-o", ref, "-q", "--steps", "2")
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:  # refused (or a fault in the default-size code): one line, exit 2, never exit 1
        assert_one_error(proc.stderr)
        proc = cli("reference", tiny_refiner, "-o", ref, "-q", "--steps", "2", "--height", "64", "--width", "64")
        assert proc.returncode == 0, proc.stderr
    line = refused(["verify", files["ckpt"], "--reference", ref], [files["ckpt"], ref], 2, "base", "refiner")
    assert len(line) < 300
    assert digests([tiny_refiner, files["ckpt"]]) == before
