"""The SD -> diffusers plan: every diffusers component's names, shapes and dtypes from SD headers, values lazy.

SD-named entries (an SD safetensors header, or a MindSpore file read under SD names) are split into the
components of the SDXL layout by prefix (``diffusers_sd.SD_PREFIXES``), each component's keys are mapped back
by ``sd_diffusers.map_sd_keys`` (the forward rule tables read backwards) and each value goes through its
transform's inverse (``keymaps.transforms``) and the requested cast inside its own loader, so one tensor is in
memory at a time. Unknown keys, missing required keys and shapes no inverse can take are found here, before any
output exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdxl_ckpt.errors import KeyMismatchError
from sdxl_ckpt.formats.dtypes import cast_array, target_dtype
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES
from sdxl_ckpt.keymaps.expected import diffusers_shapes
from sdxl_ckpt.keymaps.sd_diffusers import SourceOf, map_sd_keys
from sdxl_ckpt.keymaps.transforms import TRANSFORMS


@dataclass
class ComponentPlan:
    """One diffusers component: its config and its lazy diffusers-named entries, plus the report row."""

    name: str
    config: dict[str, Any]
    entries: list[TensorEntry]
    row: dict[str, Any]
    dropped: list[dict[str, str]] = field(default_factory=list)


def split_components(
    sd_entries: Mapping[str, TensorEntry], structure: str, path: object = None
) -> dict[str, dict[str, TensorEntry]]:
    """SD name -> entry, grouped by the component whose SD prefix the name has; a key outside them is an error."""
    prefixes = SD_PREFIXES[structure]
    groups: dict[str, dict[str, TensorEntry]] = {name: {} for name in prefixes}
    stray = []
    for key, entry in sd_entries.items():
        owner = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if owner is None:
            stray.append(key)
        else:
            groups[owner][key] = entry
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise KeyMismatchError(
            f"not part of any SDXL {structure} component (prefixes {', '.join(prefixes.values())}){more}",
            path=path,
            key=stray[0],
        )
    return groups


def _part_loader(entry: TensorEntry, transform: str, index: int, dst: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        part = TRANSFORMS[transform].inverse(entry.load())[index]
        return np.asarray(cast_array(part, entry.dtype, dst), order="C")

    return load


def _entries_of(source: SourceOf, entry: TensorEntry, requested: str | None, path: object) -> list[TensorEntry]:
    """The diffusers entries one SD tensor becomes (three for a fused q/k/v), with shapes checked now."""
    transform = TRANSFORMS[source.transform]
    shapes = transform.inverse_shape(entry.shape)
    if shapes is None:
        raise KeyMismatchError(
            f"shape {list(entry.shape)} is not one {source.transform} can produce (from {transform.needs}): "
            f"cannot map it back",
            path=path,
            key=source.sd,
        )
    dst = target_dtype(entry.dtype, requested)
    out = []
    for index, (name, shape) in enumerate(zip(source.diffusers, shapes)):
        same_bytes = transform.byte_preserving and dst == entry.dtype  # one source, bytes unchanged: copy them
        out.append(
            TensorEntry(
                name,
                dst,
                tuple(shape),
                _part_loader(entry, source.transform, index, dst),
                source=f"{entry.source}:{entry.name}",
                span=entry.passthrough_span if same_bytes else None,
            )
        )
    return out


def _in_model_order(
    name: str, entries: list[TensorEntry], expected: Mapping[str, tuple[int, ...]], path: object
) -> list[TensorEntry]:
    """The entries in the order the diffusers / transformers class registers its parameters (``state_dict`` order,
    which save_pretrained shards by), after checking that they are exactly that class's parameters and shapes."""
    by_name = {e.name: e for e in entries}
    absent = [k for k in expected if k not in by_name]
    extra = [k for k in by_name if k not in expected]
    wrong = [k for k in expected if k in by_name and by_name[k].shape != tuple(expected[k])]
    if absent or extra or wrong:
        key = (wrong or absent or extra)[0]
        what = (
            f"shape {list(by_name[key].shape)} where the {name} config gives {list(expected[key])}"
            if wrong
            else ("missing: the config needs it" if absent else "not a parameter of the model the config describes")
        )
        count = len(absent) + len(extra) + len(wrong)
        more = f" ({count - 1} more problems)" if count > 1 else ""
        raise KeyMismatchError(f"{name}: {what}{more}", path=path, key=key)
    return [by_name[k] for k in expected]


def plan_component(
    name: str,
    sd_entries: Mapping[str, TensorEntry],
    config: Mapping[str, Any],
    structure: str,
    requested: str | None,
    path: object = None,
) -> ComponentPlan:
    """Plan one component: every SD key mapped back or dropped with its reason; anything else is an error."""
    prefix = SD_PREFIXES[structure][name]
    inverse = map_sd_keys(name, sd_entries, config, prefix)
    if inverse.unknown:
        more = f" (and {len(inverse.unknown) - 1} more)" if len(inverse.unknown) > 1 else ""
        raise KeyMismatchError(
            f"no diffusers {name} tensor for this SD key under the given config{more}",
            path=path,
            key=inverse.unknown[0],
        )
    if inverse.missing:
        more = f" (and {len(inverse.missing) - 1} more)" if len(inverse.missing) > 1 else ""
        raise KeyMismatchError(
            f"incomplete {name}: the SD file lacks this key{more}", path=path, key=inverse.missing[0]
        )
    entries = [e for source in inverse.targets for e in _entries_of(source, sd_entries[source.sd], requested, path)]
    entries = _in_model_order(name, entries, diffusers_shapes(name, config), path)
    dropped = [{"component": name, "key": k, "reason": r} for k, r in inverse.dropped.items()]
    row = {
        "component": name,
        "keys_in": len(sd_entries),
        "written": len(entries),
        "transformed": sum(s.transform != "none" for s in inverse.targets),
        "dropped": len(dropped),
        "dtypes": dict(sorted(Counter(e.dtype for e in entries).items())),
        "bytes": sum(e.nbytes for e in entries),
    }
    return ComponentPlan(name, dict(config), entries, row, dropped)
