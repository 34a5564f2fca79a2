"""Does ``mindspore.load_checkpoint`` read a full-size ckpt that ``st-to-ms`` has just written, on this machine?

    python -m bench.load_checkpoint_full --sd bench/work/full/sd.safetensors

MindSpore 2.10's ``load_checkpoint`` reads the whole .ckpt into memory (``f.read()``), then refuses it unless
MemFree (``SC_AVPHYS_PAGES``: page cache not counted as free) is still larger than the file. The read adds the
file to the page cache too, so a 6.9 GB ckpt needs about 21 GB free before the call. Two runs, each in a fresh
process watched by ``bench.procmem.run_measured``:

1. right after ``st-to-ms`` (which drops its output's and its input's cached pages when it writes a .ckpt);
2. the same, after the bench's other files (its diffusers folder, its other ckpt) are evicted from the cache too:
   what a machine whose cache holds nothing else gives;
3. the same ckpt after its input is read back into the page cache (what a converter that leaves its cache
   behind would give): this is expected to be refused, and the table says what MindSpore printed.

Writes ``bench/results_load_checkpoint.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import commands, machine, pagecache, procmem

HERE = Path(__file__).resolve().parent
LOAD = (
    "import sys, time, mindspore\n"
    "t = time.perf_counter()\n"
    "params = mindspore.load_checkpoint(sys.argv[1])\n"
    "print(len(params), 'parameters', round(time.perf_counter() - t, 1), 's')\n"
)


def _mem_free() -> int:
    return machine._meminfo().get("MemFree", 0)


def _load(ckpt: Path, log_dir: Path) -> dict:
    free = _mem_free()
    m = procmem.run_measured([sys.executable, "-c", LOAD, str(ckpt)], log_dir=log_dir)
    out = (log_dir / "stdout.log").read_text().strip()
    last_error = next((line for line in reversed(m.stderr_tail.splitlines()) if "Error" in line), "")
    return {
        "mem_free_before": free,
        "ok": m.ok,
        "wall_s": round(m.wall_s, 1),
        "peak_rss": max(m.peak_total, m.peak_hwm),
        "stdout": out,
        "error": "" if m.ok else last_error[:400],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=Path, required=True, help="a full-size SD safetensors file (the bench's input)")
    parser.add_argument("--workdir", type=Path, default=HERE / "work" / "load_checkpoint")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "fresh.ckpt"
    ckpt.unlink(missing_ok=True)
    started = time.perf_counter()
    convert = procmem.run_measured(commands.st_to_ms(args.sd, ckpt, "keep"), log_dir=args.workdir / "st_to_ms")
    if not convert.ok:
        print(convert.stderr_tail, file=sys.stderr)
        return 1
    ckpt_bytes = ckpt.stat().st_size
    runs = {"right after st-to-ms": _load(ckpt, args.workdir / "load_fresh")}
    others = [p for p in args.sd.parent.rglob("*") if p.is_file() and p != ckpt]
    pagecache.evict(others)  # what else this bench left cached (its diffusers folder, the other ckpt)
    runs["after st-to-ms, the bench's other files evicted from the cache"] = _load(ckpt, args.workdir / "load_clean")
    pagecache.warm([args.sd])
    runs["after the input is read back into the page cache"] = _load(ckpt, args.workdir / "load_cached")
    ckpt.unlink(missing_ok=True)
    result = {
        "machine": machine.describe(args.workdir),
        "ckpt_bytes": ckpt_bytes,
        "st_to_ms_wall_s": round(convert.wall_s, 1),
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (HERE / "results_load_checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        f"| {name} | {r['mem_free_before'] / 1e9:.1f} GB | {'loaded' if r['ok'] else 'refused'} | {r['wall_s']} s "
        f"| {r['peak_rss'] / 1e9:.1f} GB | {r['stdout'] or r['error']} |"
        for name, r in runs.items()
    ]
    text = "\n".join(
        [
            "# mindspore.load_checkpoint on a full-size ckpt st-to-ms has just written",
            "",
            f"`python -m bench.load_checkpoint_full` on {result['machine']['ram'] / 1e9:.1f} GB RAM, "
            f"{result['machine']['cores']} cores; the synthetic full-size "
            f"SDXL base SD file (fp16, {args.sd.stat().st_size / 1e9:.2f} GB) through `sdxl-ckpt st-to-ms "
            f"--dtype keep` ({result['st_to_ms_wall_s']} s, a {ckpt_bytes / 1e9:.2f} GB ckpt), "
            "then `mindspore.load_checkpoint(ckpt)` in a fresh "
            "process. MemFree is read just before each load; MindSpore needs it above the file's size AFTER "
            "reading the whole file (its bytes and their page cache).",
            "",
            "| load | MemFree before | result | wall | peak RSS | MindSpore said |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    (HERE / "results_load_checkpoint.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
