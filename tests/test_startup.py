"""Start-up: a conversion imports only what it uses, and the fast keymap reader agrees with PyYAML.

Times are the bench's business (``python -m bench``, case "start-up"); these tests pin the causes: which
modules a command loads, and that the shortcuts (the keymap reader, the plain-string option values, the
small-tensor I/O path) give exactly what the slow paths give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sdxl_ckpt import keymaps
from sdxl_ckpt.errors import CorruptFileError
from sdxl_ckpt.formats import fastio
from sdxl_ckpt.keymaps.flowlines import parse_generated

# heavy packages a conversion never needs: MindSpore's package (~470 MB, seconds), the torch side, and what only
# progress bars, help formatting, YAML or typer's pydantic validation would pull in
NOT_FOR_A_CONVERSION = ("mindspore", "torch", "diffusers", "transformers", "yaml", "tqdm", "pydantic", "rich")

RUN_AND_LIST_MODULES = """
import json, sys
from sdxl_ckpt.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as handle:
    json.dump({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}, handle)
"""


def _modules_after(tmp_path: Path, *argv: object) -> set[str]:
    listing = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, str(listing), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(listing.read_text())
    assert result["code"] == 0
    return set(result["modules"])


@pytest.mark.parametrize("variant", keymaps.VARIANTS)
def test_fast_reader_gives_what_pyyaml_gives(variant):
    text = (keymaps.KEYMAP_DIR / f"{variant}.yaml").read_text(encoding="utf-8")
    fast = parse_generated(text)
    assert fast is not None  # the generated files are inside the subset: the fast path is really taken
    assert fast == yaml.safe_load(text)


@pytest.mark.parametrize(
    "edit",
    [
        ("dtype: float}", "dtype: true}"),  # a YAML bool, not the string "true"
        ("{ms: ", "{ms: null, x: "),  # YAML null
        ("shape: [320]", "shape: [3.2e2]"),  # a float
        ("variant: base", "variant: base  # a comment"),
        ("shape: [320]", "shape: [320, [4]]"),  # nesting
        ("\nkeys:\n", "\nkeys: !!map\n"),  # a tag
    ],
)
def test_fast_reader_declines_anything_outside_the_generated_subset(edit):
    text = (keymaps.KEYMAP_DIR / "base.yaml").read_text(encoding="utf-8")
    assert edit[0] in text
    assert parse_generated(text.replace(edit[0], edit[1], 1)) is None


def test_load_keymap_falls_back_to_pyyaml(tmp_path, monkeypatch):
    text = (keymaps.KEYMAP_DIR / "refiner.yaml").read_text(encoding="utf-8")
    edited = text.replace("variant: refiner", "variant: refiner   # edited by hand", 1)
    (tmp_path / "refiner.yaml").write_text(edited, encoding="utf-8")
    monkeypatch.setattr(keymaps, "KEYMAP_DIR", tmp_path)
    slow = keymaps.load_keymap.__wrapped__("refiner")  # bypass the per-process cache
    monkeypatch.undo()
    assert slow == keymaps.load_keymap("refiner")


@pytest.mark.slow
def test_conversions_import_only_what_they_use(tiny_base, tmp_path):
    sd, ckpt, back = tmp_path / "m.safetensors", tmp_path / "m.ckpt", tmp_path / "back.safetensors"
    steps = [
        ("diffusers-to-sd", tiny_base, "-o", sd, "-q"),
        ("st-to-ms", sd, "-o", ckpt, "-q"),
        ("ms-to-st", ckpt, "-o", back, "-q"),
    ]
    for step in steps:
        loaded = _modules_after(tmp_path, *step)
        assert "numpy" in loaded  # the listing is real
        assert not loaded & set(NOT_FOR_A_CONVERSION), (step[0], sorted(loaded & set(NOT_FOR_A_CONVERSION)))
    assert back.is_file()


def test_help_imports_neither_numpy_nor_rich(tmp_path):
    loaded = _modules_after(tmp_path, "--help")
    assert not loaded & {"numpy", "rich", "pydantic", "mindspore", "torch", "yaml", "tqdm"}


def test_option_values_still_validated_without_pydantic(tmp_path):
    """Plain strings skip typer's pydantic validator; anything else (here an int) still goes through it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdxl_ckpt.cli",
            "tiny-model",
            "--model",
            "base",
            "-o",
            str(tmp_path / "m"),
            "--seed",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Invalid value for '--seed'" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_small_reads_and_shared_handles(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 8192  # 2 MiB: one small read, one mapped view
    path.write_bytes(data)
    opened: list[str] = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    with fastio.open_sources():
        small = fastio.map_bytes(path, 7, 1000, "small")
        big = fastio.map_bytes(path, 1, fastio.SMALL_BYTES + 5, "big")
        again = fastio.map_bytes(path, 0, 3, "again")
    assert opened == [str(path)]  # one open for the whole block
    assert bytes(small) == data[7:1007] and bytes(big) == data[1 : fastio.SMALL_BYTES + 6] and bytes(again) == data[:3]
    assert not small.flags.writeable and not big.flags.writeable
    monkeypatch.undo()
    with pytest.raises(CorruptFileError, match="truncated: expected 1000 bytes, got 200"):
        fastio.map_bytes(path, len(data) - 200, 1000, "short")


def test_background_runs_small_jobs_inline_only_when_idle():
    import threading

    seen: list[int] = []
    gate = threading.Event()
    with fastio.Background() as worker:
        worker.put(seen.append, 0, inline=True)  # idle: runs now, no thread yet
        assert seen == [0] and worker._thread is None
        worker.put(gate.wait)  # the worker is busy until the gate opens
        worker.put(seen.append, 1)
        worker.put(seen.append, 2, inline=True)  # not idle: queued behind 1, never ahead of it
        assert seen == [0]
        gate.set()
    assert seen == [0, 1, 2]


def test_count_nonfinite_on_small_and_empty_tensors():
    from sdxl_ckpt.formats.nonfinite import NonFinite, count_nonfinite

    values = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], dtype=np.float16)
    assert count_nonfinite(values, "F16") == NonFinite(nan=1, inf=2)
    assert count_nonfinite(values[:0], "F16") == NonFinite()
    assert count_nonfinite(values.astype(np.float32), "F32") == NonFinite(nan=1, inf=2)
