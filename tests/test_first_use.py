"""What a first-time user meets: --version, --help that shows flags as flags, keymaps export into a new folder,
demo saying where its files are; and the sniffer's verdicts on each kind of file, without the CLI."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdxl_ckpt import __version__
from sdxl_ckpt.cli import app, main
from sdxl_ckpt.formats.atomic import is_partial_of, output_format
from sdxl_ckpt.formats.sniff import sniff
from sdxl_ckpt.sdxl.components import partial_of

OPENCLIP = "conditioner.embedders.0.model."


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sdxl-ckpt {__version__}"


def _commands() -> list[list[str]]:
    import typer

    group = typer.main.get_command(app)
    out = [[]]
    for name, command in group.commands.items():
        subs = getattr(command, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a) or "sdxl-ckpt")
def test_help_shows_flags_as_flags(capsys, argv):
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--help" in text and "<bool>" not in text
    if "--overwrite" in text:
        assert re.search(r"--overwrite\s+Replace", text), text


def test_keymaps_export_creates_its_folder(tmp_path, capsys):
    target = tmp_path / "new" / "lists"
    assert main(["keymaps", "export", "--model", "base", "-o", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["mindspore_key_base.yaml", "torch_key_base.yaml"]
    (tmp_path / "file").write_text("x")
    assert main(["keymaps", "export", "--model", "base", "-o", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_output_format_rules():
    assert output_format("a.ckpt", None, ("ckpt", "safetensors"), "st-to-ms") == "ckpt"
    assert output_format("a.SAFETENSORS", None, ("ckpt", "safetensors"), "st-to-ms") == "safetensors"
    assert output_format("a.bin", "safetensors", ("ckpt", "safetensors"), "st-to-ms") == "safetensors"
    assert output_format("a.bin", None, ("ckpt", "safetensors"), "st-to-ms") == "ckpt"


def test_leftover_names_are_only_our_own_temporaries():
    assert is_partial_of(".x.ckpt.ab_c1234.partial", "x.ckpt")
    assert not is_partial_of(".x.ckpt.partial", "x.ckpt")
    assert not is_partial_of(".x.ckpt.mine-keep.partial", "x.ckpt")
    assert not is_partial_of(".y.ckpt.abcdefgh.partial", "x.ckpt")


def test_sniffer_verdicts(tmp_path):
    def st(name: str, tensors: dict, metadata: dict | None = None) -> Path:
        save_file(tensors, tmp_path / name, metadata=metadata)
        return tmp_path / name

    z = np.zeros(2, np.float32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    (tmp_path / "t.pt").write_bytes(buffer.getvalue())
    np.savez(tmp_path / "r.npz", a=z)
    (tmp_path / "e.ckpt").write_bytes(b"")
    cases = {
        "t.pt": "torch-zip",
        "r.npz": "npz",
        "e.ckpt": "empty",
        st("sd.safetensors", {f"{p}a": z for p in ("model.diffusion_model.", "first_stage_model.", OPENCLIP)}): "sd",
        st("u.safetensors", {"model.diffusion_model.a": z}): "partial",
        st("ms.safetensors", {"model.diffusion_model.norm.gamma": z}): "ms-safetensors",
        st("d.safetensors", {"down_blocks.0.resnets.0.conv1.weight": z, "conv_in.weight": z}): "diffusers-weights",
        st("k.safetensors", {"lora_te1_text_model_x.alpha": z}): "lora-kohya",
        st("p.safetensors", {"base_model.model.x.lora_B.weight": z}): "lora-peft",
        st("l.safetensors", {"x.hada_w1_a": z}): "lycoris",
        st("n.safetensors", {}): "no-tensors",
    }  # fmt: skip
    for name, kind in cases.items():
        found = sniff(tmp_path / name, partial_of)
        assert found.kind == kind, (name, found)
    # content decides, not the suffix: safetensors bytes under .ckpt, ckpt bytes under .safetensors
    (tmp_path / "st_as.ckpt").write_bytes((tmp_path / "sd.safetensors").read_bytes())
    assert sniff(tmp_path / "st_as.ckpt", partial_of).kind == "sd"
    from sdxl_ckpt.formats.ckpt_io import write_ckpt
    from sdxl_ckpt.formats.entries import entry_from_array

    write_ckpt(tmp_path / "c.ckpt", [entry_from_array("model.diffusion_model.a", z)])
    (tmp_path / "c_as.safetensors").write_bytes((tmp_path / "c.ckpt").read_bytes())
    assert sniff(tmp_path / "c_as.safetensors").kind == "ckpt"


@pytest.mark.torch
@pytest.mark.slow
def test_demo_says_where_its_files_are(tmp_path, capsys):
    pytest.importorskip("diffusers")
    assert main(["demo", "--workdir", str(tmp_path / "wd"), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"working in {tmp_path / 'wd'} (kept)" in out
    assert "files kept in" in out and "sdxl-base.ckpt" in out and (tmp_path / "wd" / "sdxl-base.ckpt").is_file()
