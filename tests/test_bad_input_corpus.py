"""Every command on a corpus of wrong, broken and hostile inputs: never a traceback, never an unforeseen exception.

Each (command, input) pair must end with exit 0 / 1 / 2 (a wrong-but-readable file may legitimately convert or
compare), at most one ``error:`` line (problem lists continue on indented lines), no ``Traceback`` and no
``error: unexpected ...`` (the CLI's last-resort line for an exception nobody foresaw), and the input unchanged.
Runs in-process through ``cli.main`` so the ~200 pairs take seconds; the subprocess path is covered by
tests/test_user_cases.py.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main

pytestmark = pytest.mark.slow  # ~280 command runs
UNET = "model.diffusion_model."


def _sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(_sha(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


@pytest.fixture(scope="module")
def corpus(tiny_base: Path, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    sd, ckpt = d / "good.safetensors", d / "good.ckpt"
    assert main(["diffusers-to-sd", str(tiny_base), "-o", str(sd), "-q", "--json", str(d / "r.json")]) == 0
    assert main(["st-to-ms", str(sd), "-o", str(ckpt), "-q", "--json", str(d / "r.json")]) == 0
    bad = d / "bad"
    bad.mkdir()
    c: dict[str, Path] = {"missing": bad / "missing.safetensors"}
    (c.setdefault("empty_ckpt", bad / "empty.ckpt")).write_bytes(b"")
    (c.setdefault("empty_st", bad / "empty.safetensors")).write_bytes(b"")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    (c.setdefault("zip_pickle", bad / "model.ckpt")).write_bytes(buffer.getvalue())
    (c.setdefault("legacy_pickle", bad / "legacy.bin")).write_bytes(pickle.dumps({}, protocol=2))
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}, c.setdefault("kohya", bad / "k.st"))
    save_file({"unet.x.lora_A.weight": np.zeros((2, 2), np.float32)}, c.setdefault("peft", bad / "peft.safetensors"))
    tensors = load_file(sd)
    save_file(
        {k: v for k, v in tensors.items() if k.startswith(UNET)}, c.setdefault("unet_only", bad / "u.safetensors")
    )
    save_file({"a": np.zeros(3, np.float32)}, c.setdefault("stray", bad / "stray.safetensors"))
    save_file({}, c.setdefault("no_tensors", bad / "none.safetensors"))
    (c.setdefault("random", bad / "random.bin")).write_bytes(np.random.default_rng(0).bytes(4096))
    (c.setdefault("text", bad / "text.safetensors")).write_text("hello, not weights\n")
    raw = sd.read_bytes()
    (c.setdefault("truncated_st", bad / "cut.safetensors")).write_bytes(raw[: len(raw) // 2])
    (c.setdefault("truncated_ckpt", bad / "cut.ckpt")).write_bytes(ckpt.read_bytes()[:5000])
    (c.setdefault("ckpt_named_st", bad / "ckpt_bytes.safetensors")).write_bytes(ckpt.read_bytes())
    (c.setdefault("st_named_ckpt", bad / "st_bytes.ckpt")).write_bytes(raw)
    npz = io.BytesIO()
    np.savez(npz, a=np.zeros(3))
    (c.setdefault("npz_named_ckpt", bad / "ref.ckpt")).write_bytes(npz.getvalue())
    (c.setdefault("bad_npz", bad / "ref.npz")).write_bytes(npz.getvalue())
    (c.setdefault("empty_dir", bad / "empty_dir")).mkdir()
    junk = c.setdefault("junk_config_dir", bad / "junk_config")
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    index_only = c.setdefault("model_index_only", bad / "index_only")
    index_only.mkdir()
    (index_only / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    broken_pipe = c.setdefault("pipe_bad_unet", bad / "pipe_bad_unet")
    shutil.copytree(tiny_base, broken_pipe)
    (broken_pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(raw[:100])
    return {"sd": sd, "ckpt": ckpt, "tiny": tiny_base, "out": d / "out", **{f"bad:{k}": v for k, v in c.items()}}


COMMANDS = [
    ["inspect", "{X}"],
    ["inspect", "{X}", "--hash"],
    ["diff", "{X}", "{sd}"],
    ["diff", "{ckpt}", "{X}"],
    ["st-to-ms", "{X}", "-o", "{out}/o.ckpt"],
    ["st-to-ms", "{X}", "-o", "{out}/o.safetensors", "--keys", "base"],
    ["ms-to-st", "{X}", "-o", "{out}/o.safetensors"],
    ["diffusers-to-sd", "{X}", "-o", "{out}/o.safetensors"],
    ["diffusers-to-sd", "{tiny}", "--unet", "{X}", "-o", "{out}/o.safetensors"],
    ["verify", "{X}", "--reference", "{out}/none.npz"],
    ["verify", "{ckpt}", "--reference", "{X}"],
    ["reference", "{X}", "-o", "{out}/r.npz"],
]
TORCH_FREE_FOLDERS = ("reference",)  # a folder reaches diffusers' own loader: covered elsewhere, needs torch


def test_no_command_crashes_on_any_bad_input(corpus, capsys):
    out_dir = corpus["out"]
    seen = 0
    for name, bad in sorted((k, v) for k, v in corpus.items() if k.startswith("bad:")):
        before = _sha(bad)
        for template in COMMANDS:
            if template[0] in TORCH_FREE_FOLDERS and bad.is_dir():
                continue
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
            argv = [
                a.format(X=bad, sd=corpus["sd"], ckpt=corpus["ckpt"], tiny=corpus["tiny"], out=out_dir)
                for a in template
            ]
            rc = main([*argv, "-q"])
            _stdout, err = capsys.readouterr()
            where = f"{name}: {' '.join(template)}"
            assert "Traceback" not in err, where
            assert "error: unexpected" not in err, (where, err)
            assert rc in (0, 1, 2), (where, rc, err)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == (rc == 2), (where, err)
            others = [line for line in err.splitlines() if line.strip() and not line.startswith(("error:", "  "))]
            assert all(line.startswith(("note:", "warning:")) for line in others), (where, err)
            if rc == 2:
                assert not [p for p in out_dir.iterdir() if p.name != "none.npz"], where
            assert _sha(bad) == before, where
            seen += 1
    assert seen > 200
