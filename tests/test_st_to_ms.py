"""st-to-ms / ms-to-st on the tiny SDXL-shaped models: diffusers -> SD -> ckpt -> SD bit for bit, MindSpore loads
our ckpt (load_checkpoint, strict load_param_into_net), and planted faults stop the conversion (exit 2, the key
named, no output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdxl_ckpt.cli import main
from sdxl_ckpt.convert.sd_ms import check_exact
from sdxl_ckpt.formats.ckpt_io import scan_ckpt
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.keymaps.mindone import format_shape
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name

ms = pytest.importorskip("mindspore")

POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
COND_PROJ = "model.diffusion_model.time_cond_proj.weight"


def _to_sd(pipe: Path, out: Path, **kwargs) -> Path:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd

    convert_diffusers_to_sd(pipe, out, **kwargs)
    return out


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory, tiny_base, tiny_refiner, tiny_lcm, tiny_lcm_cond_proj) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sd")
    return {
        "base": _to_sd(tiny_base, folder / "base.safetensors"),
        "refiner": _to_sd(tiny_refiner, folder / "refiner.safetensors"),
        "lcm": _to_sd(tiny_lcm, folder / "lcm.safetensors", unet_dir=tiny_lcm / "lcm-unet", lcm=True),
        "lcm_cond_proj": _to_sd(
            tiny_lcm_cond_proj, folder / "lcm_cp.safetensors", unet_dir=tiny_lcm_cond_proj / "lcm-unet"
        ),
    }


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "name,variant", [("base", "base"), ("refiner", "refiner"), ("lcm", "lcm"), ("lcm_cond_proj", "lcm")]
)
def test_round_trip_bit_for_bit(sd_files, tmp_path, capsys, name, variant):
    sd = sd_files[name]
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back.safetensors"
    rc, out, err = _run(["st-to-ms", sd, "-o", ckpt, "-q", "--json", tmp_path / "to.json"], capsys)
    assert rc == 0, err
    assert f"variant {variant}" in out
    rc, out, err = _run(["ms-to-st", ckpt, "-o", back, "-q", "--keys", variant], capsys)
    assert rc == 0, err
    original, restored = load_file(sd), load_file(back)
    assert set(original) == set(restored)
    for key, array in original.items():
        assert restored[key].dtype == array.dtype and restored[key].shape == array.shape, key
        assert restored[key].tobytes() == array.tobytes(), key
    if variant != "refiner":
        assert restored[POSITION_IDS].dtype == np.int64 and np.array_equal(restored[POSITION_IDS], np.arange(77)[None])
    if name == "lcm_cond_proj":
        assert COND_PROJ in restored

    # MindSpore's own loader returns the same arrays under the keymap's names
    keymap = load_keymap(variant)
    loaded = ms.load_checkpoint(str(ckpt))
    expected_names = {keymap.sd_to_ms[k] for k in original if k in keymap.sd_to_ms}
    assert set(loaded) == expected_names
    for key, array in original.items():
        if key in keymap.sd_to_ms:
            assert np.array_equal(loaded[keymap.sd_to_ms[key]].asnumpy(), array), key


def test_strict_load_into_net(sd_files, tmp_path, capsys):
    ckpt = tmp_path / "m.ckpt"
    assert _run(["st-to-ms", sd_files["base"], "-o", ckpt, "-q"], capsys)[0] == 0
    loaded = ms.load_checkpoint(str(ckpt))

    class Net(ms.nn.Cell):
        def __init__(self, specs):
            super().__init__()
            self.weights = ms.ParameterTuple(
                [ms.Parameter(ms.Tensor(np.zeros(shape, dtype)), name=name) for name, (shape, dtype) in specs.items()]
            )

    keymap = load_keymap("base")
    # as mindone's network: CLIP-L position_ids is an int32 Parameter [1, 77]
    net = Net(
        {
            keymap.sd_to_ms[k]: (a.shape, np.int32 if k == POSITION_IDS else a.dtype)
            for k, a in load_file(sd_files["base"]).items()
            if k in keymap.sd_to_ms
        }
    )
    not_loaded, unused = ms.load_param_into_net(net, loaded, strict_load=True)
    assert not_loaded == [] and unused == []
    for param in net.get_parameters():
        assert np.array_equal(param.asnumpy(), loaded[param.name].asnumpy())


def test_dtype_and_safetensors_format(sd_files, tmp_path, capsys):
    half = tmp_path / "half.ckpt"
    assert _run(["st-to-ms", sd_files["base"], "-o", half, "-q", "--dtype", "fp16"], capsys)[0] == 0
    assert {e.dtype for e in scan_ckpt(half).entries} == {"F16", "I32"}  # position_ids: an integer, never cast
    msst = tmp_path / "ms.safetensors"
    rc, _out, err = _run(["st-to-ms", sd_files["refiner"], "-o", msst, "-q", "--format", "safetensors"], capsys)
    assert rc == 0, err
    original = load_file(sd_files["refiner"])
    loaded = ms.load_checkpoint(str(msst), format="safetensors")
    keymap = load_keymap("refiner")
    assert set(loaded) == {keymap.sd_to_ms[k] for k in original}
    for key, array in original.items():
        assert np.array_equal(loaded[keymap.sd_to_ms[key]].asnumpy(), array)
    back = tmp_path / "back.safetensors"  # and back from MindSpore-named safetensors
    assert _run(["ms-to-st", msst, "-o", back, "-q"], capsys)[0] == 0
    assert all(v.tobytes() == original[k].tobytes() for k, v in load_file(back).items())


def _faulty(sd: Path, tmp_path: Path, edit) -> Path:
    tensors = load_file(sd)
    edit(tensors)
    path = tmp_path / "faulty.safetensors"
    save_file(tensors, path)
    return path


FAULTS = {
    "shape changed": (
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        lambda t, k: t.__setitem__(k, np.zeros((t[k].shape[0], t[k].shape[1] + 1), np.float32)),
    ),
    "key renamed": (
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        lambda t, k: t.__setitem__("model.diffusion_model.output_blocks.2.2.conv.weights", t.pop(k)),
    ),
    "key missing": ("first_stage_model.decoder.up.3.block.2.norm2.bias", lambda t, k: t.pop(k)),
    "extra key": ("model.diffusion_model.extra.weight", lambda t, k: t.__setitem__(k, np.ones(3, np.float32))),
    "integer weight": (
        "conditioner.embedders.1.model.ln_final.weight",
        lambda t, k: t.__setitem__(k, t[k].astype(np.int32)),
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_planted_fault_stops_conversion(sd_files, tmp_path, capsys, fault):
    key, edit = FAULTS[fault]
    bad = _faulty(sd_files["base"], tmp_path, lambda t: edit(t, key))
    out = tmp_path / "out.ckpt"
    rc, _out, err = _run(["st-to-ms", bad, "-o", out, "-q", "--keys", "base"], capsys)
    assert rc == 2
    assert repr(key) in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))


def _check(shapes, dtypes):
    from sdxl_ckpt.sdxl.architecture import infer_architecture

    return check_exact(shapes, dtypes, infer_architecture(shapes))


def test_full_size_shapes_checked_exactly():
    """Full-size inputs are judged against the architecture read from them (headers suffice: no 7 GB file)."""
    from sdxl_ckpt.errors import InputError

    keymap = load_keymap("base")
    shapes = {s.sd: s.shape for s in keymap.specs}
    dtypes = {s.sd: "F16" if s.dtype == "float" else "I64" for s in keymap.specs}
    assert _check(shapes, dtypes).problems == []
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    shapes[key] = (640, 641)
    assert [k for k, _m in _check(shapes, dtypes).problems] == [key]
    # widths that do not add up are refused with one line naming the tensors (1281 + 6 x 256 is not 2816)
    shapes[key] = (640, 640)
    shapes["conditioner.embedders.1.model.text_projection"] = (1280, 1281)
    with pytest.raises(InputError, match="label_emb.*text_projection"):
        _check(shapes, dtypes)


def test_ms_to_st_rejects_foreign_and_corrupt(sd_files, tmp_path, capsys):
    ckpt = tmp_path / "m.ckpt"
    assert _run(["st-to-ms", sd_files["base"], "-o", ckpt, "-q"], capsys)[0] == 0
    raw = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(raw[: len(raw) // 2])
    rc, _out, err = _run(["ms-to-st", cut, "-o", tmp_path / "x.safetensors", "-q"], capsys)
    assert rc == 2 and str(cut) in err and "truncated" in err
    assert not (tmp_path / "x.safetensors").exists()
    # an existing output is never touched without --overwrite
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    rc, _out, err = _run(["ms-to-st", ckpt, "-o", out, "-q"], capsys)
    assert rc == 2 and out.read_bytes() == b"keep"


def _lists(sd: Path, tmp_path: Path, edit=None) -> tuple[Path, Path]:
    """mindone-format lists for this input (its own shapes), optionally edited as (torch lines, ms lines)."""
    from safetensors import safe_open

    with safe_open(str(sd), "np") as handle:
        names = [k for k in handle.keys() if not k.endswith("position_ids")]
        shapes = {k: handle.get_slice(k).get_shape() for k in names}
    torch_lines = [f"{k}:{format_shape(shapes[k])}" for k in names]
    ms_lines = [f"{sd_to_ms_name(k)[0]}:{format_shape(shapes[k])}" for k in names]
    if edit:
        edit(torch_lines, ms_lines)
    paths = tmp_path / "torch_key.yaml", tmp_path / "mindspore_key.yaml"
    for path, lines in zip(paths, (torch_lines, ms_lines)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def _swap(lines: list[str], a: int, b: int) -> None:
    lines[a], lines[b] = lines[b], lines[a]


def _weight_line(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if ".weight:" in line)


LIST_FAULTS = {
    "malformed": lambda t, m: m.__setitem__(_weight_line(m), m[_weight_line(m)].replace(".weight", "..weight")),
    "shape column": lambda t, m: t.__setitem__(3, t[3].split(":")[0] + ":(7, 7)"),
    "paired by position": lambda t, m: _swap(m, 10, 11),
    "rename against the rules": lambda t, m: m.__setitem__(
        _weight_line(m), m[_weight_line(m)].replace(".weight", ".gamma")
    ),
    "count": lambda t, m: m.pop(),
}


def test_mindone_lists_accepted_when_right(sd_files, tmp_path, capsys):
    torch_list, ms_list = _lists(sd_files["base"], tmp_path)
    with_lists, plain = tmp_path / "lists.ckpt", tmp_path / "plain.ckpt"
    rc, _out, err = _run(
        ["st-to-ms", sd_files["base"], "-o", with_lists, "-q", "--key-torch", torch_list, "--key-ms", ms_list], capsys
    )
    assert rc == 0, err
    assert _run(["st-to-ms", sd_files["base"], "-o", plain, "-q"], capsys)[0] == 0
    assert with_lists.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("fault", list(LIST_FAULTS))
def test_mindone_lists_checked(sd_files, tmp_path, capsys, fault):
    torch_list, ms_list = _lists(sd_files["base"], tmp_path, LIST_FAULTS[fault])
    out = tmp_path / "out.ckpt"
    rc, _out, err = _run(
        ["st-to-ms", sd_files["base"], "-o", out, "-q", "--key-torch", torch_list, "--key-ms", ms_list], capsys
    )
    assert rc == 2 and not out.exists()
    assert {
        "malformed": "malformed name",
        "shape column": "list says [7, 7]",
        "paired by position": "pairs it with",
        "rename against the rules": "the rename rules give",
        "count": "paired line by line",
    }[fault] in err, err


def test_detection_notes_and_errors(sd_files, tmp_path, capsys):
    rc, out, _err = _run(["st-to-ms", sd_files["lcm_cond_proj"], "-o", tmp_path / "a.ckpt", "-q"], capsys)
    assert rc == 0 and "variant lcm" in out
    stripped = _faulty(sd_files["lcm"], tmp_path, lambda t: None)  # same tensors, metadata gone
    rc, out, _err = _run(["st-to-ms", stripped, "-o", tmp_path / "b.ckpt", "-q"], capsys)
    assert rc == 0 and "variant base" in out and "--keys lcm" in out
    refiner_as_base = tmp_path / "c.ckpt"
    rc, _out, err = _run(["st-to-ms", sd_files["refiner"], "-o", refiner_as_base, "-q", "--keys", "base"], capsys)
    assert rc == 2 and "refiner key structure" in err and not refiner_as_base.exists()
    neither = _faulty(
        sd_files["refiner"],
        tmp_path,
        lambda t: t.pop("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"),
    )
    rc, _out, err = _run(["st-to-ms", neither, "-o", tmp_path / "d.ckpt", "-q"], capsys)
    assert rc == 2 and "resblocks.9.mlp.c_proj.bias" in err


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore, via the bench's helper)."""
    from bench.pagecache import resident_bytes

    found = resident_bytes(path)
    if found is None:
        pytest.skip("the kernel does not report page-cache residency here")
    return found


def test_ckpt_output_leaves_no_page_cache(sd_files, tmp_path, capsys):
    """MindSpore's load_checkpoint needs MemFree (cache not counted) above the ckpt's size after reading it: st-to-ms
    to a .ckpt drops its output's and its input's cached pages; a safetensors output leaves both cached, as a copy
    would (dropping 7 GB of cache costs ~0.3 s)."""
    from bench.pagecache import evict, warm

    src = tmp_path / "base.safetensors"
    src.write_bytes(sd_files["base"].read_bytes())
    evict([src])
    if _resident(src):
        pytest.skip("this filesystem keeps pages the kernel was told to drop (tmpfs?)")
    warm([src])
    assert _resident(src) > 0
    out = tmp_path / "base.ckpt"
    rc, _, err = _run(["st-to-ms", src, "-o", out, "--quiet"], capsys)
    assert rc == 0, err
    assert _resident(src) == 0 and _resident(out) == 0
    warm([src])
    rc, _, err = _run(["st-to-ms", src, "-o", tmp_path / "base_ms.safetensors", "--quiet"], capsys)
    assert rc == 0, err
    assert _resident(src) > 0 and _resident(tmp_path / "base_ms.safetensors") > 0
