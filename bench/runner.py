"""One bench run: inputs per scale, every case several times in round-robin order, then summaries and targets.

Round-robin (case A, B, C, A, B, C, ...) instead of A, A, A, B, B, B: on a shared or thermally drifting machine
a slow minute then hurts every case alike instead of one. Before each run the case's input is put in the chosen
page-cache state and the resident share is measured; after each run the output is measured and deleted (the
full-size outputs would not all fit on a small disk).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import commands, pagecache
from bench.cases import Case
from bench.inputs import Inputs, check_free_space, ensure_inputs, ensure_reference
from bench.machine import describe, mem_available
from bench.procmem import run_measured


@dataclass
class Config:
    scales: list[str]
    workdir: Path
    repeat: int = 3
    cache: str = "warm"  # "warm" | "cold"
    interval: float = 0.02
    cap_fraction: float = 0.8  # of MemAvailable just before each run
    cap_bytes: int | None = None  # fixed cap instead
    diffusers_src: dict[str, Path] = field(default_factory=dict)  # scale -> existing folder
    keep_logs: bool = True


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _path_size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _clear(folder: Path) -> None:
    """Remove everything in ``folder`` (outputs and any temp file a failed or killed run left behind)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _cap(cfg: Config) -> int | None:
    if cfg.cap_bytes is not None:
        return cfg.cap_bytes
    avail = mem_available()
    return int(avail * cfg.cap_fraction) if avail else None


def run_once(case: Case, inputs: Inputs, cfg: Config, rep: int) -> dict:
    """Prepare the cache, run the case's command measured, record and delete its output."""
    out_dir = inputs.root / "out"
    _clear(out_dir)
    out = out_dir / case.output
    argv = case.argv(inputs, out)
    resident = pagecache.prepare(inputs.files(case.reads), cfg.cache)
    load_before = os.getloadavg()[0]
    m = run_measured(
        argv, log_dir=inputs.root / "logs" / f"{case.key}.{rep}", interval=cfg.interval, cap_bytes=_cap(cfg)
    )
    record = m.as_dict()
    record.update(
        rep=rep, resident_fraction=resident, load_before=load_before, output_bytes=_path_size(out) if m.ok else None
    )
    _clear(out_dir)
    return record


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(case: Case, runs: list[dict], input_bytes: int) -> dict:
    ok = [r for r in runs if r["ok"]]
    walls = [r["wall_s"] for r in ok]
    peak = [max(r["peak_total"], r["peak_hwm"]) for r in runs]
    if not runs:
        status = "not run"
    elif len(ok) == len(runs):
        status = "ok"
    elif any(r["exceeded_cap"] for r in runs):
        status = "exceeded memory cap"
    else:
        status = "failed"
    return {
        "key": case.key,
        "title": case.title,
        "kind": case.kind,
        "reads": case.reads,
        "reference": case.reference,
        "input_bytes": input_bytes,
        "status": status,
        "runs_ok": len(ok),
        "runs": runs,
        "wall_median": _median(walls),
        "wall_min": min(walls, default=None),
        "wall_max": max(walls, default=None),
        # memory peaks over ALL runs: a run killed at the cap still shows how far it got
        "peak_anon": max((r["peak_anon"] for r in runs), default=None),
        "peak_file": max((r["peak_file"] for r in runs), default=None),
        "peak_rss": max(peak, default=None),
        "output_bytes": next((r["output_bytes"] for r in ok if r["output_bytes"] is not None), None),
        "resident_min": min((r["resident_fraction"] for r in runs if r["resident_fraction"] is not None), default=None),
        "cap_bytes": min((r["cap_bytes"] for r in runs if r["cap_bytes"]), default=None),
        "error": next((r["stderr_tail"] for r in runs if not r["ok"] and r["stderr_tail"]), None),
    }


def add_ratios(summaries: dict[str, dict]) -> None:
    """Time relative to the plain copy, paired by round: each round's run over that round's copy, then the median.

    Pairing matters on a shared machine: a busy minute slows both runs of a round, so it cancels in their ratio.
    ``ratio_of_medians`` (median wall / median copy wall) is kept in the JSON for comparison.
    """
    for s in summaries.values():
        s["ratio_to_copy"] = s["ratio_of_medians"] = None
        s["ratios_by_round"] = []
        ref = summaries.get(s["reference"]) if s["reference"] else None
        if not ref:
            continue
        copies = {r["rep"]: r["wall_s"] for r in ref["runs"] if r["ok"]}
        s["ratios_by_round"] = [r["wall_s"] / copies[r["rep"]] for r in s["runs"] if r["ok"] and r["rep"] in copies]
        s["ratio_to_copy"] = _median(s["ratios_by_round"])
        if ref["wall_median"] and s["wall_median"] is not None:
            s["ratio_of_medians"] = s["wall_median"] / ref["wall_median"]


def run_scale(scale: str, cases: list[Case], cfg: Config) -> dict:
    """Inputs, then ``cfg.repeat`` round-robin passes over the available cases."""
    inputs = ensure_inputs(scale, cfg.workdir, cfg.diffusers_src.get(scale), log=_log)
    check_free_space(inputs.root, int(2.1 * inputs.size("sd")), "the largest output (fp32 ckpt)")
    # start-up alone is a tiny-scale question: at full size it would only re-read the input into the cache
    cases = [c for c in cases if c.kind != "startup" or scale == "tiny"]
    available = [c for c in cases if c.needs is None or commands.has_command(c.needs)]
    for c in cases:
        if c not in available:
            _log(f"[bench] {scale}: skipping {c.key}: `sdxl-ckpt {c.needs}` does not exist yet")
    if any(c.kind == "verify" for c in available):
        ensure_reference(inputs, log=_log)
    runs: dict[str, list[dict]] = {c.key: [] for c in cases}
    started = time.time()
    for rep in range(cfg.repeat):
        for case in available:
            record = run_once(case, inputs, cfg, rep)
            runs[case.key].append(record)
            state = (
                "ok" if record["ok"] else ("exceeded cap" if record["exceeded_cap"] else f"exit {record['returncode']}")
            )
            _log(
                f"[bench] {scale:5s} {case.key:16s} run {rep + 1}/{cfg.repeat}: {record['wall_s']:8.2f} s  "
                f"peak {max(record['peak_total'], record['peak_hwm']) / 2**20:8.1f} MiB  {state}"
            )
    summaries = {c.key: summarize(c, runs[c.key], inputs.size(c.reads)) for c in cases}
    for c in cases:
        if c not in available:
            summaries[c.key]["status"] = f"unavailable (no `sdxl-ckpt {c.needs}`)"
    add_ratios(summaries)
    from sdxl_ckpt.formats.safetensors_io import read_safetensors

    largest = max(read_safetensors(inputs.sd).entries, key=lambda e: e.nbytes)
    return {
        "largest_tensor": {"name": largest.name, "bytes": largest.nbytes, "dtype": largest.dtype},
        "inputs": {
            kind: {"files": [str(p) for p in inputs.files(kind)], "bytes": inputs.size(kind)}
            for kind in ("diffusers", "sd", "ckpt")
        },
        "elapsed_s": time.time() - started,
        "cases": summaries,
    }


def evaluate_targets(scales: dict[str, dict]) -> list[dict]:
    """The issue's targets: copy ratios and memory on the largest scale measured (judged at full size only: tiny
    timings are Python start-up, not IO), start-up seconds on the tiny scale."""
    scale = "full" if "full" in scales else next(iter(scales), None)
    if scale is None:
        return []
    from bench.cases import CASES

    by_key = {c.key: c for c in CASES}
    results = []
    for key, s in scales.get("tiny", {}).get("cases", {}).items():
        case = by_key[key]
        if case.target_tiny_s is not None:
            value = s.get("wall_median") if s["status"] == "ok" else None
            results.append(
                {
                    "scale": "tiny",
                    "case": key,
                    "what": f"tiny: wall <= {case.target_tiny_s:g} s (process start to exit)",
                    "value": value,
                    "limit": case.target_tiny_s,
                    "met": None if value is None else value <= case.target_tiny_s,
                }
            )
    for key, s in scales[scale]["cases"].items():
        case = by_key[key]
        if case.target_ratio is not None:
            value = s.get("ratio_to_copy")
            against = "plain copy" if by_key[case.reference].kind == "copy" else f"the {case.reference} run"
            results.append(
                {
                    "scale": scale,
                    "case": key,
                    "what": f"wall <= {case.target_ratio}x {against}",
                    "value": value,
                    "limit": case.target_ratio,
                    "met": None if value is None or scale != "full" else value <= case.target_ratio,
                }
            )
        if case.target_rss is not None:
            value = s.get("peak_rss") if s["status"] == "ok" else None
            results.append(
                {
                    "scale": scale,
                    "case": key,
                    "what": f"peak RSS < {case.target_rss / 1e9:g} GB",
                    "value": value,
                    "limit": case.target_rss,
                    "met": None if value is None or scale != "full" else value < case.target_rss,
                }
            )
    return results


def run(cases: list[Case], cfg: Config) -> dict:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    machine = describe(cfg.workdir)
    scales = {}
    for scale in cfg.scales:
        scales[scale] = run_scale(scale, cases, cfg)
    return {
        "machine": machine,
        "load_avg_end": list(os.getloadavg()),
        "config": {
            "scales": cfg.scales,
            "repeat": cfg.repeat,
            "cache": cfg.cache,
            "interval_s": cfg.interval,
            "cap_fraction": cfg.cap_fraction,
            "cap_bytes": cfg.cap_bytes,
            "workdir": str(cfg.workdir),
            "cli": list(commands.cli()),
        },
        "scales": scales,
        "targets": evaluate_targets(scales),
    }
