"""SD single file or MindSpore ckpt -> diffusers SDXL pipeline folder, streamed, through the rule tables backwards.

Composition: the input under SD names (``safetensors_io`` header, or ``ms_input.read_mindspore_as_sd`` for
MindSpore names) -> the component configs (the ``sdxl_ckpt.config.*`` metadata ``diffusers-to-sd`` writes, else the
architecture inferred from the weights) -> ``keymaps.sd_diffusers_plan`` (names, inverse transforms, casts,
all checked before writing) -> one ``write_safetensors`` per weight file (shards in diffusers' convention),
configs, scheduler, ``model_index.json`` and optional tokenizers, all inside a hidden folder that is renamed
into place when complete (``formats.atomic.atomic_output_dir``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdxl_ckpt.convert.ms_input import read_mindspore_as_sd
from sdxl_ckpt.errors import CorruptFileError, InputError
from sdxl_ckpt.formats.atomic import atomic_output_dir, check_output_dir
from sdxl_ckpt.formats.dtypes import DTYPE_CHOICES, to_float32
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES
from sdxl_ckpt.keymaps.sd_diffusers_plan import ComponentPlan, plan_component, split_components
from sdxl_ckpt.sdxl.architecture import METADATA, WEIGHTS, infer_architecture
from sdxl_ckpt.sdxl.configs import model_index
from sdxl_ckpt.sdxl.variants import LATENT_MARKERS, MARKERS, VARIANT_NAMES, Detection, structure_of

CONFIG_METADATA = "sdxl_ckpt.config."  # + component: its config.json text, written by diffusers-to-sd
WEIGHT_BASENAME = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
FILE_METADATA = {"format": "pt"}  # what save_pretrained writes; transformers refuses files without a known format
SIZE_UNITS = {
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", re.IGNORECASE)
# an inferred config gets the class fields save_pretrained writes (diffusers' from_pretrained checks _class_name)
CLASS_FIELDS = {"unet": {"_class_name": "UNet2DConditionModel"}, "vae": {"_class_name": "AutoencoderKL"}}
TOKENIZER_HINT = (
    "copy {names} from the original diffusers model (e.g. stabilityai/stable-diffusion-xl-base-1.0) into the "
    "folder, or rerun with --tokenizers DIR; until then pass tokenizer objects to from_pretrained"
)


# --- options ----------------------------------------------------------------------------------------------------


def parse_shard_size(size: str | int | None) -> int | None:
    """diffusers' ``max_shard_size``: bytes, or a number with KB/MB/GB/TB (decimal, as huggingface_hub) or KiB..."""
    if size is None or isinstance(size, int):
        return size
    match = _SIZE.fullmatch(size)
    if not match:
        raise InputError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB or a number of bytes")
    value = float(match.group(1)) * SIZE_UNITS.get((match.group(2) or "").upper(), 1)
    if value < 1:
        raise InputError(f"--max-shard-size {size!r} must be at least one byte")
    return int(value)


def weight_file_name(component: str, variant: str | None, suffix: str = "") -> str:
    """``diffusion_pytorch_model[.VARIANT][-00001-of-00003].safetensors`` (``model...`` for text encoders)."""
    return WEIGHT_BASENAME[component] + (f".{variant}" if variant else "") + suffix + ".safetensors"


def index_file_name(component: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors.index[.VARIANT].json``, where save_pretrained puts the variant."""
    return WEIGHT_BASENAME[component] + ".safetensors.index" + (f".{variant}" if variant else "") + ".json"


def split_shards(entries: Sequence[TensorEntry], max_bytes: int | None) -> list[list[TensorEntry]]:
    """huggingface_hub's rule: in order, start a new shard when the next tensor would pass ``max_bytes``; a tensor
    larger than ``max_bytes`` gets a shard of its own."""
    if max_bytes is None:
        return [list(entries)]
    shards: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    size = 0
    for entry in entries:
        if entry.nbytes > max_bytes:
            shards.append([entry])
            continue
        if current and size + entry.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    return shards or [[]]


# --- input ------------------------------------------------------------------------------------------------------


def _is_mindspore(src: Path, metadata: Mapping[str, str] | None) -> bool:
    return src.suffix == ".ckpt" or (metadata or {}).get("format") == "ms"


def read_sd_input(src: str | os.PathLike, keys: str = "auto") -> dict[str, Any]:
    """The input under SD names: entries, metadata, variant and how it was decided, input kind."""
    src = Path(src)
    header = None if src.suffix == ".ckpt" else read_safetensors(src)
    if _is_mindspore(src, header.metadata if header else None):
        ms = read_mindspore_as_sd(src, keys)
        notes = [ms.detection.note] if ms.detection.note else []
        if ms.records is not None:
            notes.append(f"{ms.records} ckpt records" + ("; crc verified" if ms.crc_checked else ""))
        return {
            "kind": "mindspore",
            "entries": ms.entries,
            "metadata": ms.metadata,
            "variant": ms.detection.variant,
            "variant_reason": ms.detection.reason,
            "notes": notes,
        }
    entries = header.by_name()
    if keys == "auto":
        detection = infer_architecture({n: e.shape for n, e in entries.items()}, header.metadata, path=src).detection
    elif keys in VARIANT_NAMES:
        detection = Detection(keys, "--keys")
    else:
        raise InputError(f"--keys must be one of auto, {', '.join(VARIANT_NAMES)}, not {keys!r}")
    return {
        "kind": "sd",
        "entries": entries,
        "metadata": header.metadata,
        "variant": detection.variant,
        "variant_reason": detection.reason,
        "notes": [detection.note] if detection.note else [],
    }


def component_configs(
    structure: str, metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], path: object
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, Any], dict[str, str]]:
    """(config per component, where each came from, scheduler config, inferred fields the weights left open).

    A component's config is the ``sdxl_ckpt.config.<component>`` metadata ``diffusers-to-sd`` writes when the file
    has it (the original config.json), else the architecture inferred from the weights; the plan then checks
    every tensor's name and shape against the config either way. The scheduler is the variant's.
    """
    architecture = infer_architecture(shapes, metadata, path=path)
    guessed = {k: v for k, v in architecture.provenance.items() if v not in (WEIGHTS, METADATA)}
    if architecture.structure != structure:
        raise InputError(f"keys say SDXL {structure}, the weights' layout says {architecture.structure}", path=path)
    configs: dict[str, dict[str, Any]] = {}
    provenance: dict[str, str] = {}
    guesses: dict[str, str] = {}
    for name in SD_PREFIXES[structure]:
        text = metadata.get(CONFIG_METADATA + name)
        if text is not None:
            try:
                config = json.loads(text)
            except json.JSONDecodeError:
                raise CorruptFileError(f"metadata {CONFIG_METADATA}{name} is not valid JSON", path=path) from None
            if not isinstance(config, dict):
                raise CorruptFileError(f"metadata {CONFIG_METADATA}{name} is not a JSON object", path=path)
            configs[name] = config
            provenance[name] = f"metadata {CONFIG_METADATA}{name}"
        elif name in architecture.configs:
            configs[name] = {**CLASS_FIELDS.get(name, {}), **architecture.configs[name]}
            provenance[name] = "inferred from the weights"
            guesses |= {k: v for k, v in guessed.items() if k.startswith(name + ".")}
        else:
            raise InputError(f"no {name} weights (expected keys under {SD_PREFIXES[structure][name]!r})", path=path)
    scheduler = {"_class_name": "EulerDiscreteScheduler", **architecture.scheduler}
    scheduler.setdefault("_diffusers_version", model_index("base")["_diffusers_version"])
    return configs, provenance, scheduler, guesses


def _carry_markers(entries: Mapping[str, TensorEntry], configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The variant's marker tensors, which a diffusers folder states in its configs instead: Playground's latent
    statistics go into the VAE config (``latents_mean`` / ``latents_std``, unless its stored config has them);
    the v-prediction / EDM flags are already in the variant's scheduler config. Returns the report rows."""
    rows: dict[str, dict[str, str]] = {}
    for name, entry in entries.items():
        if name not in MARKERS:
            continue
        where = "scheduler"
        if name in LATENT_MARKERS:
            where = "vae"
            field = LATENT_MARKERS[name]
            if configs["vae"].get(field) is None:
                configs["vae"][field] = [float(v) for v in to_float32(entry.load(), entry.dtype).reshape(-1)]
        rows[name] = {"component": where, "key": name, "reason": f"in the {where} config: {MARKERS[name]}"}
    return rows


# --- output -----------------------------------------------------------------------------------------------------


def _write_component(
    folder: Path, plan: ComponentPlan, config_text: str, variant: str | None, max_bytes: int | None, quiet: bool
) -> list[str]:
    folder.mkdir()
    (folder / "config.json").write_text(config_text, encoding="utf-8")
    shards = split_shards(plan.entries, max_bytes)
    files = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        suffix = f"-{i + 1:05d}-of-{len(shards):05d}" if len(shards) > 1 else ""
        name = weight_file_name(plan.name, variant, suffix)
        write_safetensors(folder / name, shard, FILE_METADATA, quiet=quiet, desc=f"{plan.name} {i + 1}/{len(shards)}")
        files.append(name)
        weight_map |= {e.name: name for e in shard}
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in plan.entries)}, "weight_map": weight_map}
        name = index_file_name(plan.name, variant)
        (folder / name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(name)
    return files


def _config_text(config: Mapping[str, Any], original: str | None, dtype: str | None) -> str:
    """The original config text when nothing changed; else diffusers' own JSON layout (indent 2, sorted keys)."""
    stored = {"F16": "float16", "F32": "float32", "BF16": "bfloat16"}.get(dtype or "")
    fields = [k for k in ("torch_dtype", "dtype") if k in config]
    if original is not None and not (stored and fields):
        return original
    return (
        json.dumps({**config, **dict.fromkeys(fields, stored)} if stored else dict(config), indent=2, sort_keys=True)
        + "\n"
    )


def _tokenizer_names(structure: str) -> list[str]:
    return ["tokenizer_2"] if structure == "refiner" else ["tokenizer", "tokenizer_2"]


def _check_tokenizers(tokenizers: str | os.PathLike | None, structure: str) -> Path | None:
    if tokenizers is None:
        return None
    folder = Path(tokenizers)
    absent = [n for n in _tokenizer_names(structure) if not (folder / n).is_dir()]
    if absent:
        raise InputError(f"--tokenizers: no {' or '.join(f'{n}/' for n in absent)} folder here", path=folder)
    return folder


def convert_sd_to_diffusers(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: str = "keep",
    max_shard_size: str | int | None = None,
    tokenizers: str | os.PathLike | None = None,
    keys: str = "auto",
    overwrite: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Write the diffusers folder for ``src`` at ``out`` (atomic, streaming) and return the report."""
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    if dtype not in DTYPE_CHOICES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype!r}")
    if variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", variant):
        raise InputError(f"--variant {variant!r}: letters, digits and _ only (it becomes part of file names)")
    max_bytes = parse_shard_size(max_shard_size)
    check_output_dir(out, overwrite, inputs=(src,))
    source = read_sd_input(src, keys)
    model_variant, entries, metadata = source["variant"], source["entries"], source["metadata"]
    structure = structure_of(model_variant)
    tokenizer_dir = _check_tokenizers(tokenizers, structure)
    shapes = {n: e.shape for n, e in entries.items()}
    configs, provenance, scheduler, guesses = component_configs(structure, metadata, shapes, src)
    markers = _carry_markers(entries, configs)
    requested = DTYPE_CHOICES[dtype]
    groups = split_components({n: e for n, e in entries.items() if n not in markers}, structure, src)
    plans = [plan_component(n, groups[n], configs[n], structure, requested, src) for n in SD_PREFIXES[structure]]

    notes = list(source["notes"])
    if variant == "fp16" and any(d in ("F32", "BF16", "F64") for p in plans for d in p.row["dtypes"]):
        notes.append("--variant fp16 names the files only; the weights are not all fp16 (add --dtype fp16)")
    index = model_index(model_variant)
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    with atomic_output_dir(out, overwrite) as tmp:
        for plan in plans:
            text = _config_text(plan.config, metadata.get(CONFIG_METADATA + plan.name), requested)
            plan.row["files"] = _write_component(tmp / plan.name, plan, text, variant, max_bytes, quiet)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            for name in _tokenizer_names(structure):
                shutil.copytree(tokenizer_dir / name, tmp / name)
    names = " and ".join(f"{n}/" for n in _tokenizer_names(structure))
    if tokenizer_dir is None:
        notes.append(f"no tokenizers in the folder (a checkpoint holds none): {TOKENIZER_HINT.format(names=names)}")
    dropped = [d for p in plans for d in p.dropped] + list(markers.values())
    return {
        "command": "sd-to-diffusers",
        "source": str(src),
        "input": source["kind"],
        "output": str(out),
        "variant": model_variant,
        "variant_reason": source["variant_reason"],
        "pipeline": index["_class_name"],
        "configs": provenance,
        "config_guesses": guesses,
        "scheduler": scheduler["_class_name"],
        "dtype": dtype,
        "weights_variant": variant,
        "max_shard_size": max_bytes,
        "tokenizers": str(tokenizer_dir) if tokenizer_dir is not None else None,
        "components": [p.row for p in plans],
        "dropped": dropped,
        "notes": notes,
        "tensors_in": len(entries),
        "tensors": sum(p.row["written"] for p in plans),
        "bytes": sum(p.row["bytes"] for p in plans),
        "seconds": round(time.perf_counter() - started, 3),
    }


def render_report(report: Mapping[str, Any]) -> str:
    """The human summary: one row per component, then dropped keys and notes (the JSON form has everything)."""
    from sdxl_ckpt.report import human_bytes, render_table

    rows = [
        {
            "component": r["component"],
            "keys in": r["keys_in"],
            "written": r["written"],
            "transformed": r["transformed"],
            "dropped": r["dropped"],
            "files": len(r.get("files", [])),
            "dtypes": " ".join(f"{k}:{v}" for k, v in r["dtypes"].items()),
            "size": human_bytes(r["bytes"]),
        }
        for r in report["components"]
    ]
    configs = sorted(set(report["configs"].values()))
    lines = [
        f"{report['source']} -> {report['output']}  [{report['variant']}: {report['variant_reason']}]",
        f"{report['pipeline']}, scheduler {report['scheduler']}, dtype {report['dtype']}; configs: "
        + ("metadata sdxl_ckpt.config.*" if all(c.startswith("metadata") for c in configs) else "; ".join(configs)),
        render_table(rows),
    ]
    for d in report["dropped"]:
        lines.append(f"dropped {d['component']}:{d['key']}: {d['reason']}")
    lines += [f"note: {n}" for n in report["notes"]]
    if report["config_guesses"]:
        fields = sorted({k.split(".", 1)[1] for k in report["config_guesses"]})
        lines.append(
            f"note: {len(report['config_guesses'])} config fields are not in the weights and took the SDXL "
            f"convention ({', '.join(fields[:6])}{', ...' if len(fields) > 6 else ''}; see --json config_guesses)"
        )
    lines.append(
        f"{report['tensors_in']} SD tensors -> {report['tensors']} diffusers tensors, "
        f"{human_bytes(report['bytes'])} in {report['seconds']:.2f} s"
    )
    return "\n".join(lines)
