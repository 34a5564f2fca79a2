"""Bad input and bad luck never cost data: each case through the real CLI commands.

Every failure must give exactly one ``error:`` line on stderr (no traceback), the documented exit code
(2 bad input, 3 cannot write, 130 interrupted; README "Exit codes"), no partial or temporary output, and an
existing file left byte-for-byte and mtime unchanged. NaN / Inf are not failures: they are converted as they are
and reported (a ``warning:`` line), never hidden. Signals and resource limits are exercised in subprocesses.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main
from sdxl_ckpt.formats.ckpt_io import record_header, scan_ckpt
from sdxl_ckpt.formats.dtypes import ST_TO_MS

UNET = "model.diffusion_model."
BASE_SENTINEL = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
NAN_KEY = f"{UNET}input_blocks.1.0.in_layers.2.weight"
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


# --- helpers ------------------------------------------------------------------------------------------------------


def run(capsys, *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_sub(*argv: object, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdxl_ckpt.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def assert_one_error(err: str, *needles: str) -> None:
    """Exactly one non-empty stderr line, an ``error:`` line, containing every needle; no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def old_file(path: Path, content: bytes = b"precious, not a checkpoint\n") -> tuple[bytes, int]:
    path.write_bytes(content)
    os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return snapshot(path)


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tiny_base: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny base as SD safetensors and ckpt, plus a copy of the SD file holding NaN and Inf (and its ckpt)."""
    out = tmp_path_factory.mktemp("hardening")
    paths = {
        "sd": out / "base.safetensors",
        "ckpt": out / "base.ckpt",
        "nan_sd": out / "nan.safetensors",
        "nan_ckpt": out / "nan.ckpt",
    }
    assert main(["diffusers-to-sd", str(tiny_base), "-o", str(paths["sd"]), "-q", "--json", str(out / "r.json")]) == 0
    assert main(["st-to-ms", str(paths["sd"]), "-o", str(paths["ckpt"]), "-q", "--json", str(out / "r.json")]) == 0
    tensors = load_file(paths["sd"])
    bad = tensors[NAN_KEY].copy()
    bad.reshape(-1)[[0, 5]] = np.nan
    bad.reshape(-1)[7] = -np.inf
    tensors[NAN_KEY] = bad
    save_file(tensors, paths["nan_sd"], metadata={"sdxl_ckpt.variant": "base"})
    assert (
        main(["st-to-ms", str(paths["nan_sd"]), "-o", str(paths["nan_ckpt"]), "-q", "--json", str(out / "r.json")]) == 0
    )
    return paths


# --- corrupt safetensors ------------------------------------------------------------------------------------------


def crafted(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


SAFETENSORS_CASES = {
    "not-json": (lambda p: crafted(p, b"{this is not json}   "), "not valid JSON"),
    "not-utf8": (lambda p: crafted(p, b'{"a": "\xff\xfe"}       '), "not valid JSON"),
    "offsets-past-end": (
        lambda p: crafted(p, b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8),
        "past the end",
    ),
    "header-larger-than-file": (lambda p: crafted(p, b"{}", length=1 << 20), "truncated"),
    "implausible-header-length": (lambda p: crafted(p, b"{}", length=1 << 62), "implausible"),
    "too-short": (lambda p: p.write_bytes(b"\x01\x02") and p, "no header length"),
    "shape-disagrees": (
        lambda p: crafted(p, b'{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
        "needs 6",
    ),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_corrupt_safetensors_header(capsys, tmp_path, good, case):
    make, needle = SAFETENSORS_CASES[case]
    bad = make(tmp_path / "bad.safetensors")
    for argv in (
        ["inspect", bad],
        ["st-to-ms", bad, "-o", tmp_path / "out.ckpt"],
        ["diff", good["sd"], bad],
        ["ms-to-st", bad, "-o", tmp_path / "out.safetensors"],
    ):
        rc, _out, err = run(capsys, *argv, "-q")
        assert rc == 2, (argv, err)
        assert_one_error(err, "bad.safetensors", needle)
    assert listing(tmp_path) == {"bad.safetensors"}


def test_truncated_safetensors(capsys, tmp_path, good):
    data = good["sd"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    for argv in (["inspect", cut, "--hash"], ["st-to-ms", cut, "-o", tmp_path / "out.ckpt"], ["diff", good["sd"], cut]):
        rc, _out, err = run(capsys, *argv, "-q")
        assert rc == 2
        assert_one_error(err, "cut.safetensors", "truncated")
    assert listing(tmp_path) == {"cut.safetensors"}


# --- corrupt ckpt -------------------------------------------------------------------------------------------------


def second_record_offset(ckpt: Path) -> int:
    first = scan_ckpt(ckpt).entries[0]
    return len(record_header(first.name, first.shape, ST_TO_MS[first.dtype], first.nbytes)) + first.nbytes


def corrupt_ckpt(good_ckpt: Path, target: Path, how: str) -> Path:
    data = bytearray(good_ckpt.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "garbage-record":
        start = second_record_offset(good_ckpt)
        data[start + 1 : start + 12] = b"\xff" * 11  # the record's length varint becomes endless
    elif how == "bad-tensor-type":
        at = data.index(b"Float32")
        data[at : at + 7] = b"Float99"
    elif how == "not-a-ckpt":
        data[:16] = b"\x07" * 16
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(
    "how, needle",
    [
        ("truncated", "truncated"),
        ("garbage-record", "varint"),
        ("bad-tensor-type", "Float99"),
        ("not-a-ckpt", "not a MindSpore ckpt"),
    ],
)
def test_corrupt_ckpt_record(capsys, tmp_path, good, how, needle):
    bad = corrupt_ckpt(good["ckpt"], tmp_path / "bad.ckpt", how)
    for argv in (["inspect", bad], ["ms-to-st", bad, "-o", tmp_path / "out.safetensors"], ["diff", bad, good["sd"]]):
        rc, _out, err = run(capsys, *argv, "-q")
        assert rc == 2, (argv, err)
        assert_one_error(err, "bad.ckpt", needle)
    assert listing(tmp_path) == {"bad.ckpt"}


def test_pickle_checkpoint_is_refused_not_unpickled(capsys, tmp_path):
    fake = tmp_path / "model.ckpt"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a torch.save zip
    rc, _out, err = run(capsys, "inspect", fake)
    assert rc == 2
    assert_one_error(err, "pickle")


# --- NaN / Inf ----------------------------------------------------------------------------------------------------


def warning_lines(err: str) -> list[str]:
    assert "Traceback" not in err and "error:" not in err
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_nan_inf_reported_by_inspect_and_diff(capsys, good):
    rc, out, err = run(capsys, "inspect", good["nan_sd"], "--hash", "-q")
    assert rc == 0
    assert f"non-finite values in 1 tensor(s):\n  {NAN_KEY}: 2 NaN, 1 Inf" in out
    assert len(warning_lines(err)) == 1 and NAN_KEY in err
    rc, out, err = run(capsys, "diff", good["sd"], good["nan_sd"], "-q")
    assert rc == 1
    assert f"non-finite: {NAN_KEY}: A 0 NaN 0 Inf, B 2 NaN 1 Inf" in out
    assert f"  {NAN_KEY}: max abs inf" in out and "(2 NaN only on one side)" in out
    assert len(warning_lines(err)) == 1
    rc, out, err = run(capsys, "diff", good["nan_sd"], good["nan_ckpt"], "-q")  # NaN == NaN at the same place
    assert rc == 0 and len(warning_lines(err)) == 1


def test_nan_inf_warned_by_converters(capsys, tmp_path, good, tiny_base):
    expected = f"key {NAN_KEY!r}: 2 NaN, 1 Inf values (written as they are)"
    rc, _out, err = run(capsys, "st-to-ms", good["nan_sd"], "-o", tmp_path / "x.ckpt", "-q")
    assert rc == 0 and [line for line in warning_lines(err) if expected in line]
    rc, _out, err = run(capsys, "ms-to-st", good["nan_ckpt"], "-o", tmp_path / "x.safetensors", "-q")
    assert rc == 0 and [line for line in warning_lines(err) if expected in line]
    folder = shutil.copytree(tiny_base, tmp_path / "pipe")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    tensors["conv_in.weight"].reshape(-1)[0] = np.inf
    save_file(tensors, unet_file)
    rc, _out, err = run(capsys, "diffusers-to-sd", folder, "-o", tmp_path / "y.safetensors", "-q")
    assert rc == 0
    assert warning_lines(err) == [
        f"warning: key '{UNET}input_blocks.0.0.weight': 0 NaN, 1 Inf values (written as they are)"
    ]


# --- diffusers folders --------------------------------------------------------------------------------------------


def test_diffusers_folder_missing_component(capsys, tmp_path, tiny_base):
    folder = shutil.copytree(tiny_base, tmp_path / "pipe")
    shutil.rmtree(folder / "vae")
    rc, _out, err = run(capsys, "diffusers-to-sd", folder, "-o", tmp_path / "out.safetensors", "-q")
    assert rc == 2
    assert_one_error(err, "vae folder is missing")
    rc, out, _err = run(capsys, "inspect", folder, "-q")
    assert rc == 0 and "incomplete pipeline: no vae folder" in out
    rc, _out, err = run(capsys, "diff", folder, tiny_base, "-q")
    assert rc == 2
    assert_one_error(err, "vae folder is missing")
    assert not (tmp_path / "out.safetensors").exists()


def test_diffusers_folder_with_two_weight_formats(capsys, tmp_path, tiny_base):
    folder = shutil.copytree(tiny_base, tmp_path / "pipe")
    unet = folder / "unet"
    shard = unet / "diffusion_pytorch_model-00001-of-00001.safetensors"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", shard)
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    for argv in (["diffusers-to-sd", folder, "-o", tmp_path / "out.safetensors"], ["inspect", folder]):
        rc, _out, err = run(capsys, *argv, "-q")
        assert rc == 2
        assert_one_error(err, "ambiguous weights", "diffusion_pytorch_model.safetensors.index.json")
    assert not (tmp_path / "out.safetensors").exists()
    # pickle weights beside the safetensors ones are never read: converted, and the user is told
    (unet / "diffusion_pytorch_model.safetensors.index.json").unlink()
    shard.unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04")
    rc, out, err = run(capsys, "diffusers-to-sd", folder, "-o", tmp_path / "out.safetensors", "-q")
    assert rc == 0 and "ignored pickle weights diffusion_pytorch_model.bin" in out and err == ""


# --- unknown variant ----------------------------------------------------------------------------------------------


def test_unknown_variant(capsys, tmp_path, good):
    tensors = load_file(good["sd"])
    del tensors[BASE_SENTINEL]
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, odd)
    rc, _out, err = run(capsys, "st-to-ms", odd, "-o", tmp_path / "out.ckpt", "-q")
    assert rc == 2
    assert_one_error(err, "not an SDXL checkpoint", BASE_SENTINEL)
    rc, out, err = run(capsys, "inspect", odd, "-q")
    assert rc == 0 and "variant: unknown (not an SDXL checkpoint" in out and err == ""
    rc, _out, err = run(capsys, "st-to-ms", good["sd"], "-o", tmp_path / "out.ckpt", "--keys", "sdxl9", "-q")
    assert rc == 2
    assert_one_error(err, "sdxl9")
    assert listing(tmp_path) == {"odd.safetensors"}


# --- outputs: existing, read-only folder, full disk, interrupt ----------------------------------------------------


def conversions(good: dict[str, Path], tiny_base: Path, out_dir: Path) -> list[list[object]]:
    return [
        ["st-to-ms", good["sd"], "-o", out_dir / "out.ckpt"],
        ["ms-to-st", good["ckpt"], "-o", out_dir / "out.safetensors"],
        ["diffusers-to-sd", tiny_base, "-o", out_dir / "out.safetensors"],
    ]


def test_existing_output_is_never_modified(capsys, tmp_path, good, tiny_base):
    for argv in conversions(good, tiny_base, tmp_path):
        target = Path(argv[-1])
        before = old_file(target)
        rc, _out, err = run(capsys, *argv, "-q")
        assert rc == 2
        assert_one_error(err, "output exists", "--overwrite")
        assert snapshot(target) == before
        target.unlink()
    assert listing(tmp_path) == set()


def _drop_dac_override() -> None:
    """In the child, before exec: drop root's power to ignore file permissions from the capability bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_output_folder(capsys, tmp_path, good, tiny_base):
    """A 0555 folder. Root ignores modes, so as root the commands run in a child without CAP_DAC_OVERRIDE."""
    as_root = os.geteuid() == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("x")
    os.chmod(locked, 0o555)
    try:
        for argv in conversions(good, tiny_base, locked):
            if as_root:
                try:
                    proc = run_sub(*argv, "-q", preexec_fn=_drop_dac_override)
                except subprocess.SubprocessError as exc:
                    pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({exc})")
                rc, err = proc.returncode, proc.stderr
            else:
                rc, _out, err = run(capsys, *argv, "-q")
            assert rc == 3, err
            assert_one_error(err, "not writable")
        assert listing(locked) == {"keep.txt"}
    finally:
        os.chmod(locked, 0o755)


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk(tmp_path, good, tiny_base):
    """RLIMIT_FSIZE stands in for a full disk: write() fails with EFBIG (main() ignores SIGXFSZ) -> exit 3."""
    for argv in conversions(good, tiny_base, tmp_path):
        proc = run_sub(*argv, "-q", preexec_fn=_limit_file_size(1 << 20))
        assert proc.returncode == 3, proc.stderr
        assert_one_error(proc.stderr, "write failed", "File too large")
        assert listing(tmp_path) == set()
    # with --overwrite, a failed write still leaves the existing file as it was
    target = tmp_path / "out.ckpt"
    before = old_file(target)
    proc = run_sub("st-to-ms", good["sd"], "-o", target, "--overwrite", "-q", preexec_fn=_limit_file_size(1 << 20))
    assert proc.returncode == 3
    assert_one_error(proc.stderr, "File too large")
    assert snapshot(target) == before and listing(tmp_path) == {"out.ckpt"}


SLOW_READS = textwrap.dedent("""
    # Run the CLI with every tensor read slowed down and announced, so a test can interrupt it mid-write.
    import pathlib, sys, time
    import sdxl_ckpt.formats.safetensors_io as sio
    from sdxl_ckpt.cli import main

    marker = pathlib.Path(sys.argv[1])
    plain = sio._reader

    def slow_reader(*args, **kwargs):
        load = plain(*args, **kwargs)
        def announced():
            marker.touch()
            time.sleep(0.05)
            return load()
        return announced

    sio._reader = slow_reader
    sys.exit(main(sys.argv[2:]))
""")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal, even if this test runs in the background


@pytest.mark.parametrize("command", ["st-to-ms", "diffusers-to-sd"])
def test_interrupt_mid_write(tmp_path, good, tiny_base, command):
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_READS)
    marker, out_dir = tmp_path / "reading", tmp_path / "out"
    out_dir.mkdir()
    src = good["sd"] if command == "st-to-ms" else tiny_base
    target = out_dir / ("x.ckpt" if command == "st-to-ms" else "x.safetensors")
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(marker), command, str(src), "-o", str(target), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and any(p.suffix == ".partial" for p in out_dir.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(0.2)  # a few tensors into the write
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert_one_error(err, "interrupted; no output was written")
    assert listing(out_dir) == set()


def test_output_gets_ordinary_permissions(tmp_path):
    """Outputs are written through mkstemp (mode 0600); the finished file must get 0666 minus the umask instead."""
    from sdxl_ckpt.formats.entries import entry_from_array
    from sdxl_ckpt.formats.safetensors_io import write_safetensors

    umask = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "x.safetensors", [entry_from_array("w", np.ones(3, np.float32))])
    finally:
        os.umask(umask)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644
