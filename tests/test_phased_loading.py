"""One model phase in memory at a time: verify's runtime frees the text encoders before the UNet is filled and the
UNet before the VAE is; the torch reference frees the text encoders before its UNet is filled. Both still check
every key of the file, and compute the same numbers as loading everything.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import verify_support as vs
from verify_support import BASE_SIZE

from sdxl_ckpt.errors import KeyMismatchError
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, write_ckpt
from sdxl_ckpt.formats.reference_npz import load_reference

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def base_case(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return vs.base_case(tiny_base, tmp_path_factory)


def _watch_fills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], list[str]]]:
    """Record each component fill of the runtime as (component, the filled component cells still alive then, the
    components whose host memory blocks are still mapped then)."""
    from sdxl_ckpt.sdxl_runtime import api, host_memory
    from sdxl_ckpt.sdxl_runtime.model import CELL_ATTRIBUTES

    events: list[tuple[str, list[str], list[str]]] = []
    cells: dict[str, weakref.ref] = {}
    maps: list[tuple[str, weakref.ref]] = []
    filling: list[str] = []
    real_fill, real_block = api.fill, host_memory._Block.__init__

    def block(self, nbytes):
        real_block(self, nbytes)
        maps.append((filling[-1], weakref.ref(self.map)))

    def fill(net, wanted, report, components, quiet=True):
        (component,) = components
        alive = sorted({name for name, ref in maps if ref() is not None})
        events.append((component, sorted(name for name, ref in cells.items() if ref() is not None), alive))
        filling.append(component)
        real_fill(net, wanted, report, components, quiet)
        cells[component] = weakref.ref(getattr(net, CELL_ATTRIBUTES[component]))

    monkeypatch.setattr(api, "fill", fill)
    monkeypatch.setattr(host_memory._Block, "__init__", block)
    return events


def test_verify_frees_the_text_encoders_before_the_unet_is_filled(base_case, monkeypatch):
    from sdxl_ckpt.verify.verify import verify_checkpoint

    ckpt, ref = base_case
    events = _watch_fills(monkeypatch)
    report = verify_checkpoint(ckpt, load_reference(ref))
    assert report.passed, report.first_failure
    assert report.context["load_phases"] == [
        "fill conditioner",
        "release conditioner",
        "fill unet",
        "release unet",
        "fill vae",
    ]
    # each phase's cells (and so their parameters) are gone, not merely dropped from the net, when the next fills;
    # so is the host memory their weights lay in, although the text encoders and the UNet have been evaluated
    assert events == [("conditioner", [], []), ("unet", [], []), ("vae", [], [])]


def test_a_key_missing_from_the_unet_is_named_before_anything_is_filled(base_case, tmp_path, monkeypatch):
    from sdxl_ckpt.verify.verify import verify_checkpoint

    ckpt, ref = base_case
    gone = "model.diffusion_model.output_blocks.0.0.out_layers.3.weight"
    entries = [e for e in scan_ckpt(ckpt).entries if e.name != gone]
    assert len(entries) == len(scan_ckpt(ckpt).entries) - 1
    broken = tmp_path / "no_unet_key.ckpt"
    write_ckpt(broken, entries, overwrite=True)
    events = _watch_fills(monkeypatch)
    with pytest.raises(KeyMismatchError) as err:
        verify_checkpoint(broken, load_reference(ref))
    assert f"1 parameter(s) missing from the file: {gone}" in str(err.value)
    assert events == []  # refused before the text encoders were filled, not after the text stages


def test_a_stray_key_is_named_too(base_case, tmp_path):
    from sdxl_ckpt.verify.verify import verify_checkpoint

    ckpt, ref = base_case
    entries = scan_ckpt(ckpt).entries
    stray = replace(entries[-1], name="model.diffusion_model.extra_block.weight")
    write_ckpt(tmp_path / "stray.ckpt", [*entries, stray], overwrite=True)
    with pytest.raises(KeyMismatchError, match=r"1 unexpected key\(s\) no parameter takes: .*extra_block\.weight"):
        verify_checkpoint(tmp_path / "stray.ckpt", load_reference(ref))


def _reference_pair(src: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object, list[bool]]:
    """(unphased, phased) references of ``src``; whether the text encoders were empty at each UNet fill."""
    from sdxl_ckpt.reference import deferred
    from sdxl_ckpt.reference.reference import make_reference

    encoders_empty: list[bool] = []
    real_fill = deferred.DeferredUNet.fill
    real_release = deferred.release_text_encoders
    released: list[object] = []

    def release(pipe):
        real_release(pipe)
        released.append(pipe)

    def fill(self):
        pipe = released[-1]
        encoders_empty.append(all(p.is_meta for p in pipe.text_encoder_2.parameters()))
        assert all(p.is_meta for p in self.unet.parameters())  # nothing of the UNet allocated before
        real_fill(self)

    monkeypatch.setattr(deferred.DeferredUNet, "fill", fill)
    monkeypatch.setattr(deferred, "release_text_encoders", release)
    settings = {"steps": 2, **BASE_SIZE}
    return make_reference(src, phased=False, **settings), make_reference(src, **settings), encoders_empty


def _assert_identical(a, b) -> None:
    assert sorted(a.arrays) == sorted(b.arrays)
    for name in a.arrays:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert a.meta == b.meta


def test_phased_reference_is_bit_identical_from_a_folder(tiny_base, monkeypatch):
    whole, phased, encoders_empty = _reference_pair(tiny_base, monkeypatch)
    assert encoders_empty == [True]
    _assert_identical(whole, phased)


def test_phased_reference_is_bit_identical_from_an_sd_file(base_case, monkeypatch):
    ckpt, _ = base_case
    whole, phased, encoders_empty = _reference_pair(ckpt.with_suffix(".safetensors"), monkeypatch)
    assert encoders_empty == [True]  # diffusers' converter only renames the UNet's tensors: phased here too
    _assert_identical(whole, phased)
