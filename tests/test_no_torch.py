"""A MindSpore-only machine (an Ascend host) converts, inspects and verifies without torch installed.

The commands run in a subprocess whose import system refuses torch, diffusers, transformers and accelerate, so
any import of them on these code paths (even an unused one) fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import verify_support as vs

BLOCKER = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'diffusers', 'transformers', 'accelerate'):
            raise ImportError('blocked on a MindSpore-only machine: ' + name)
sys.meta_path.insert(0, _NoTorch())
from sdxl_ckpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=600)


def test_blocker_really_blocks(tmp_path):
    result = run_without_torch("reference", "nowhere", "-o", str(tmp_path / "ref.npz"), "-q")
    assert result.returncode != 0
    assert not (tmp_path / "ref.npz").exists()


@pytest.mark.slow
def test_convert_inspect_verify_without_torch(tiny_base: Path, tmp_path_factory, tmp_path):
    _, ref = vs.base_case(tiny_base, tmp_path_factory)  # the reference side needs torch: built in this process
    sd, ckpt, back = tmp_path / "base.safetensors", tmp_path / "base.ckpt", tmp_path / "back.safetensors"
    steps = [
        ("diffusers-to-sd", str(tiny_base), "-o", str(sd), "-q"),
        ("st-to-ms", str(sd), "-o", str(ckpt), "-q"),
        ("ms-to-st", str(ckpt), "-o", str(back), "-q"),
        ("inspect", str(ckpt), "-q"),
        ("diff", str(sd), str(back), "-q"),
        ("verify", str(ckpt), "--reference", str(ref), "-q"),
    ]
    for step in steps:
        result = run_without_torch(*step)
        assert result.returncode == 0, (step[0], result.stdout[-2000:], result.stderr[-2000:])
    assert "PASS" in result.stdout
