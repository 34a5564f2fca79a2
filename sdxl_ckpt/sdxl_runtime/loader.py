"""Strict, streaming weight loading: checkpoint keys fill the network's parameters name for name.

The runtime's parameter names ARE the MindSpore keymap names, so loading is a check plus a fill, no renaming:
1. scan the file (record framing / safetensors header only: names, dtypes, shapes, no tensor bytes);
2. compare with the network: a parameter the file lacks, a key no parameter takes, a shape or a dtype that
   differs -> KeyMismatchError naming them, before a single tensor is read;
3. read one tensor at a time in file order, cast it explicitly to its parameter's dtype, hand it over, drop it.
The network's parameters are created lazily (nothing allocated before their fill), so peak memory is the network
plus one tensor. Step 3 can also run per component (``fill``): the check of step 2 still covers the whole file,
but only the components of the current phase need to be filled (see ``SDXLRuntime`` ``phased``).

Accepted files: a MindSpore ``.ckpt`` (scanned by ``sdxl_ckpt.formats.ckpt_io.scan_ckpt``) and a safetensors
file holding MindSpore names (what ``st-to-ms --format safetensors`` writes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from sdxl_ckpt.errors import KeyMismatchError, require_file
from sdxl_ckpt.formats.castpipe import widen_half_span, widen_half_threaded
from sdxl_ckpt.formats.dtypes import FLOAT_DTYPES, to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.progress import byte_bar
from sdxl_ckpt.sdxl.variants import MARKERS
from sdxl_ckpt.sdxl_runtime.host_memory import HugePageArena
from sdxl_ckpt.sdxl_runtime.model import SDXLNet, component_of

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
POSITION_IDS = ".position_ids"  # mindone's CLIP declares it as a Parameter; this network derives it
MAX_NAMED = 8  # keys spelled out per kind of mismatch; the count says how many more


@dataclass
class LoadReport:
    """What a load did: file, components filled, tensors and bytes read, keys of other components skipped."""

    path: str
    components: tuple[str, ...]
    tensors: int = 0
    bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0
    source_dtypes: dict[str, int] = field(default_factory=dict)


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix.lower() == ".ckpt":
        return False
    with open(path, "rb") as handle:  # safetensors: u64 header length, then a JSON object
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_entries(path: str | os.PathLike) -> tuple[list[TensorEntry], dict[str, str]]:
    """Lazy entries (+ metadata, empty for a .ckpt) of a MindSpore-named checkpoint; no tensor bytes read."""
    path = require_file(path)
    if _is_safetensors(path):
        from sdxl_ckpt.formats.safetensors_io import read_safetensors

        st = read_safetensors(path)
        return list(st.entries), dict(st.metadata)
    from sdxl_ckpt.formats.ckpt_io import scan_ckpt

    return list(scan_ckpt(path).entries), {}


def return_freed_memory() -> None:
    """Drop MindSpore's caches, collect released cells and hand the freed memory back to the OS.

    On CPU the weights live in ``HugePageArena`` blocks, each freed when the last tensor in it is released. The
    PyNative executor keeps references to tensors its kernels last used (a bias, a weight view) until
    ``ms_memory_recycle``: without it one such tensor keeps its whole block mapped (3.5 GB of a released
    full-size UNet). Small parameters from numpy live in malloc's heap, which ``malloc_trim`` returns. On a device,
    weights widened by MindSpore's cast live in its memory pool and serve the next phase.
    """
    import ctypes
    import gc

    ms.ms_memory_recycle()
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _named(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:MAX_NAMED])
    more = len(keys) - MAX_NAMED
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_entries(net: SDXLNet, entries: Iterable[TensorEntry], path: object = None) -> tuple[list[TensorEntry], int]:
    """The entries that fill ``net`` (file order) and how many belong to components not built; else raise.

    Raises KeyMismatchError listing every parameter left unset, every unused key, every shape or dtype that
    cannot fill its parameter (the first offending key is also the error's ``key``).
    """
    params = net.named_params()
    wanted: list[TensorEntry] = []
    unexpected: list[str] = []
    bad: list[str] = []
    seen: set[str] = set()
    skipped = 0
    for entry in entries:
        if entry.name in seen:
            bad.append(f"{entry.name} (stored twice)")
            continue
        seen.add(entry.name)
        param = params.get(entry.name)
        if param is None:
            component = component_of(entry.name)
            if entry.name.endswith(POSITION_IDS) or entry.name in MARKERS:
                skipped += 1  # a buffer the network computes itself (0..76), or a fact, not a weight
            elif component is not None and component not in net.components:
                skipped += 1
            else:
                unexpected.append(entry.name)
            continue
        if tuple(entry.shape) != tuple(param.shape):
            bad.append(f"{entry.name} (file {list(entry.shape)}, network {list(param.shape)})")
        elif entry.dtype not in FLOAT_DTYPES:
            bad.append(f"{entry.name} (dtype {entry.dtype}, expected a floating type)")
        else:
            wanted.append(entry)
    missing = [name for name in params if name not in seen]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the file: {_named(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) no parameter takes: {_named(unexpected)}")
    if bad:
        problems.append(f"{len(bad)} key(s) that cannot fill their parameter: {_named(bad)}")
    if problems:
        first = sorted(missing)[:1] or sorted(unexpected)[:1] or [sorted(bad)[0].split(" ")[0]]
        raise KeyMismatchError("refusing to load: " + "; ".join(problems), path=path, key=first[0])
    return wanted, skipped


def fill(
    net: SDXLNet, wanted: Sequence[TensorEntry], report: LoadReport, components: Iterable[str], quiet: bool = True
) -> None:
    """Fill the parameters of ``components`` from their entries in ``wanted`` (already checked), one tensor at a time.

    Only one tensor's conversions are alive at a time; the file's mapped bytes are dropped after each tensor.
    """
    start = time.perf_counter()
    chosen = set(components)
    todo = [e for e in wanted if component_of(e.name) in chosen]
    params = net.named_params()
    arena = HugePageArena() if ms.get_context("device_target") == "CPU" else None
    with byte_bar(sum(e.nbytes for e in todo), "loading", quiet) as bar:
        for entry in todo:
            param = params[entry.name]
            target = np.float16 if str(param.dtype) == "Float16" else np.float32
            if arena is not None:
                # on CPU the parameter takes an array placed on huge pages (no copy); fp16 into fp32 is widened
                # on the bits on every core, 4-5x faster than MindSpore's CPU cast kernel
                values = arena.empty(entry.shape, target)
                span = entry.passthrough_span
                if entry.dtype == "F16" and target is np.float32 and span is not None:
                    widen_half_span(span[0], span[1], values, entry.name)
                elif entry.dtype == "F16" and target is np.float32:
                    widen_half_threaded(entry.load(), out=values)
                else:
                    values[...] = to_float32(entry.load(), entry.dtype).astype(target, copy=False)
                param.set_data(Tensor.from_numpy(values))
            elif entry.dtype == "F16" and target is np.float32:
                # on a device the cast runs there; the source shares the file's bytes and is dropped before they are
                source = Tensor.from_numpy(np.ascontiguousarray(entry.load()))
                param.set_data(ops.cast(source, ms.float32))
                del source
            else:
                values = to_float32(entry.load(), entry.dtype).astype(target, copy=False)
                param.set_data(Tensor(np.ascontiguousarray(values)))
            del param
            _count(report, entry, bar)
    if arena is not None:
        arena.close()
    report.seconds += time.perf_counter() - start


def _count(report: LoadReport, entry: TensorEntry, bar: Any) -> None:
    report.tensors += 1
    report.bytes += entry.nbytes
    report.source_dtypes[entry.dtype] = report.source_dtypes.get(entry.dtype, 0) + 1
    bar.update(entry.nbytes)


def load_entries(net: SDXLNet, entries: Iterable[TensorEntry], path: object = None, quiet: bool = True) -> LoadReport:
    """Check, then fill ``net`` from ``entries`` one tensor at a time (each cast to its parameter's dtype)."""
    start = time.perf_counter()
    wanted, skipped = check_entries(net, entries, path)
    report = LoadReport(str(path), net.components, skipped=skipped, seconds=time.perf_counter() - start)
    fill(net, wanted, report, net.components, quiet)
    return report
