"""The diffusers -> SD plan: every output name, shape and dtype from the folder's headers, values produced lazily.

``diffusers_folder`` (lazy entries per component) -> ``keymaps.diffusers_sd`` (names + transforms) -> lazy SD
entries (transform and cast inside each loader, one tensor in memory at a time). Everything that can be wrong
with the input (missing folders, ambiguous weights, unexpected keys, shapes a transform cannot take) is found
while planning, before any output exists. ``diffusers-to-sd`` writes the plan; ``diff`` and ``inspect`` read it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_ckpt import __version__
from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.diffusers_folder import Component, component_folders, read_component, read_scheduler_config
from sdxl_ckpt.formats.dtypes import DTYPE_CHOICES, FLOAT_DTYPES, cast_array, numpy_dtype, target_dtype
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES, Target, map_component_keys
from sdxl_ckpt.keymaps.transforms import TRANSFORMS
from sdxl_ckpt.sdxl.variants import (
    COND_PROJ_KEY,
    LATENT_MARKERS,
    MARKERS,
    MODELSPEC_ARCHITECTURE,
    VARIANT_METADATA,
    detect_from_configs,
    markers_from_scheduler,
)

LOGIT_SCALE = math.log(100.0)  # CLIP's learned temperature, as stored in the official SDXL file


# --- lazy values ----------------------------------------------------------------------------------------------------


def _planned_shape(target: Target, shapes: Sequence[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """The output shape of ``target`` from its sources' shapes; a shape the transform cannot take is an error."""
    transform = TRANSFORMS[target.transform]
    if not transform.accepts(shapes):
        raise KeyMismatchError(
            f"expected {transform.needs} for {target.transform}, got shape(s) {[list(s) for s in shapes]}",
            path=where,
            key=target.sources[0],
        )
    return transform.shape(shapes)


def _loader(
    sources: list[TensorEntry], transform: str, dst: str, shape: tuple[int, ...], name: str
) -> Callable[[], np.ndarray]:
    src = sources[0].dtype

    def load() -> np.ndarray:
        # reshape: np.ascontiguousarray (used by casts) turns a 0-d array into a 1-d one
        arrays = [e.load() for e in sources]
        return np.ascontiguousarray(cast_array(TRANSFORMS[transform].forward(arrays), src, dst, key=name)).reshape(
            shape
        )

    return load


def _generated_entry(name: str, generator: str, component: Component, float_dtype: str) -> TensorEntry:
    if generator == "position_ids":
        count = int(component.config.get("max_position_embeddings", 77))
        array = np.arange(count, dtype=np.int64)[None, :]
        return TensorEntry(name, "I64", tuple(array.shape), lambda: array, f"generated: int64 arange [1, {count}]")
    if generator == "logit_scale":
        value = cast_array(np.array([LOGIT_SCALE], dtype=np.float32), "F32", float_dtype).reshape(())
        return TensorEntry(name, float_dtype, (), lambda: value, "generated: ln(100)")
    raise InputError(f"unknown generator {generator!r}")


def _marker_entries(names: set[str], scheduler: dict[str, Any], vae: dict[str, Any]) -> list[TensorEntry]:
    """The marker tensors other tools read (Playground's latent statistics, ComfyUI's v-prediction flags)."""
    out = []
    for name in sorted(names):
        if name in LATENT_MARKERS:
            values = vae[LATENT_MARKERS[name]]
            array = np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1)
        elif name.startswith("edm_vpred."):
            array = np.asarray(float(scheduler[name.removeprefix("edm_vpred.")]), dtype=np.float32)
        else:  # v_pred, ztsnr: presence is the fact (ComfyUI saves empty tensors)
            array = np.zeros((0,), dtype=np.float32)
        out.append(TensorEntry(name, "F32", tuple(array.shape), lambda a=array: a, f"generated: {MARKERS[name]}"))
    return out


# --- planning -------------------------------------------------------------------------------------------------------


def _requested_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    if dtype in DTYPE_CHOICES:
        return DTYPE_CHOICES[dtype]
    if dtype in FLOAT_DTYPES:
        return dtype
    raise InputError(f"unknown --dtype {dtype!r} (expected one of {', '.join(DTYPE_CHOICES)})")


def _check_context(arch: str, unet: Component, encoders: Sequence[Component]) -> None:
    """The UNet's cross-attention width must be the encoders' hidden sizes together (base 768+1280, refiner 1280)."""
    expected = sum(int(c.config.get("hidden_size", 0)) for c in encoders)
    got = unet.config.get("cross_attention_dim")
    if got != expected:
        names = " + ".join(f"{c.name} {c.config.get('hidden_size')}" for c in encoders)
        raise InputError(
            f"UNet cross_attention_dim is {got}, but the {arch} text encoders give {expected} "
            f"({names}): UNet and encoders do not belong together",
            path=unet.folder / "config.json",
        )


def _plan_component(
    component: Component, prefix: str, requested: str | None
) -> tuple[list[TensorEntry], dict[str, Any], list[dict[str, str]]]:
    by_name = {e.name: e for e in component.entries}
    source_of = component.source_of()
    cmap = map_component_keys(component.name, by_name, component.config, prefix, source_of=source_of)
    if cmap.unknown:
        key = cmap.unknown[0]
        more = f" (and {len(cmap.unknown) - 1} more)" if len(cmap.unknown) > 1 else ""
        raise KeyMismatchError(
            f"unexpected key in {component.name}: no SDXL rule maps it{more}", path=source_of[key], key=key
        )
    if cmap.missing:
        more = f" (and {len(cmap.missing) - 1} more)" if len(cmap.missing) > 1 else ""
        raise KeyMismatchError(
            f"incomplete {component.name}: no source key gives SD key {cmap.missing[0]!r}{more}", path=component.folder
        )
    entries: list[TensorEntry] = []
    for target in cmap.targets:
        sources = [by_name[k] for k in target.sources]
        dtypes = {e.dtype for e in sources}
        if len(dtypes) > 1:
            raise KeyMismatchError(
                f"q, k, v have different dtypes {sorted(dtypes)}", path=sources[0].source, key=target.sources[0]
            )
        shape = _planned_shape(target, [e.shape for e in sources], sources[0].source)
        dst = target_dtype(sources[0].dtype, requested)
        numpy_dtype(dst)
        same_bytes = (
            TRANSFORMS[target.transform].byte_preserving and dst == sources[0].dtype
        )  # the writer may copy them
        entries.append(
            TensorEntry(
                target.name,
                dst,
                shape,
                _loader(sources, target.transform, dst, shape, target.name),
                source=" + ".join(f"{e.source}:{e.name}" for e in sources),
                span=sources[0].passthrough_span if same_bytes else None,
            )
        )
    floats = Counter(e.dtype for e in entries if e.dtype in FLOAT_DTYPES)
    float_dtype = floats.most_common(1)[0][0] if floats else (requested or "F32")
    generated = [_generated_entry(name, gen, component, float_dtype) for name, gen in cmap.generated]
    entries += generated
    dropped = [{"component": component.name, "key": k, "reason": r} for k, r in cmap.dropped.items()]
    row = {
        "component": component.name,
        "folder": str(component.folder),
        "weights": [p.name for p in component.weights.files],
        "weights_variant": component.weights.variant,
        "keys_in": len(component.entries),
        "written": len(entries),
        "transformed": sum(t.transform != "none" for t in cmap.targets),
        "generated": [e.name for e in generated],
        "dropped": len(dropped),
        "dtypes": dict(sorted(Counter(e.dtype for e in entries).items())),
        "bytes": sum(e.nbytes for e in entries),
    }
    return entries, row, dropped


def plan_sd_entries(
    src_dir: str | Path,
    unet_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    variant: str | None = None,
    dtype: str | None = None,
    lcm: bool = False,
) -> tuple[list[TensorEntry], dict[str, str], dict[str, Any]]:
    """Plan the SD file for a diffusers SDXL folder: (lazy SD-named entries, metadata, plan report).

    ``unet_dir`` / ``vae_dir`` replace the folder's own component (e.g. a distilled LCM UNet); ``variant`` picks
    ``*.VARIANT.safetensors`` weights; ``dtype`` (keep|fp16|fp32|bf16) casts floating tensors only; ``lcm`` marks the
    output as LCM (also implied by a UNet with ``time_cond_proj_dim``). No tensor bytes are read.
    """
    requested = _requested_dtype(dtype)
    folders = component_folders(src_dir, {"unet": unet_dir, "vae": vae_dir})
    for name in ("unet", "vae", "text_encoder_2"):  # text_encoder: only a base needs it, known after the UNet
        if not folders[name].is_dir():
            raise InputError(
                f"{name} folder is missing (expected a diffusers SDXL pipeline folder)", path=folders[name]
            )
    unet = read_component("unet", folders["unet"], variant)
    text_encoder_2 = read_component("text_encoder_2", folders["text_encoder_2"], variant)
    vae = read_component("vae", folders["vae"], variant)
    scheduler = read_scheduler_config(src_dir)
    declared = {VARIANT_METADATA: "lcm"} if lcm else {}
    arch, detection = detect_from_configs(
        unet.config, text_encoder_2.config, scheduler, vae.config, declared, path=unet.folder / "config.json"
    )
    notes: list[str] = []
    components = [unet, vae]
    if arch == "base":
        text_encoder = read_component("text_encoder", folders["text_encoder"], variant)
        _check_context(arch, unet, [text_encoder, text_encoder_2])
        components += [text_encoder, text_encoder_2]
    else:
        _check_context(arch, unet, [text_encoder_2])
        components.append(text_encoder_2)
        if folders["text_encoder"].is_dir():
            notes.append(f"{folders['text_encoder']} ignored: the refiner has no CLIP-L encoder")
    cond_proj = bool(unet.config.get("time_cond_proj_dim"))
    if lcm and arch != "base":
        raise InputError("an LCM UNet has the SDXL base structure; this UNet is a refiner", path=unet.folder)
    if cond_proj and not lcm:
        notes.append("UNet has time_cond_proj_dim (guidance embedding): marked as LCM")
    model_variant = detection.variant

    entries: list[TensorEntry] = []
    rows: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    for component in components:
        part, row, gone = _plan_component(component, SD_PREFIXES[arch][component.name], requested)
        entries += part
        rows.append(row)
        dropped += gone
        notes += [f"{component.name}: {n}" for n in component.notes]
    if cond_proj:
        notes.append(f"UNet guidance embedding time_embedding.cond_proj.weight written as {COND_PROJ_KEY}")
    markers = _marker_entries(markers_from_scheduler(scheduler, vae.config), scheduler, vae.config)
    entries += markers
    for marker in markers:
        notes.append(f"{marker.name} written ({MARKERS[marker.name]}): the SD file's only way to say so")

    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[arch],
        "modelspec.implementation": "sgm",
        "modelspec.title": Path(src_dir).resolve().name + (" (LCM)" if model_variant == "lcm" else ""),
        VARIANT_METADATA: model_variant,
        "sdxl_ckpt.version": __version__,
    }
    for component in components:
        metadata[f"sdxl_ckpt.source.{component.name}"] = str(component.folder.resolve())
        metadata[f"sdxl_ckpt.config.{component.name}"] = component.config_text
    report = {
        "command": "diffusers-to-sd",
        "source": str(src_dir),
        "architecture": arch,
        "variant": model_variant,
        "dtype": dtype or "keep",
        "components": rows,
        "dropped": dropped,
        "notes": notes,
        "tensors": len(entries),
        "bytes": sum(e.nbytes for e in entries),
    }
    return entries, metadata, report
