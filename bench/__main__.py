"""``python -m bench``: make the synthetic inputs (once), measure every case, write results.md and results.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import cases as cases_mod
from bench.inputs import InputBuildError
from bench.runner import Config, run
from bench.tables import render_markdown, write_results

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--scale",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny: the SDXL-shaped tiny model (seconds); full: the real SDXL base size (7 GB files, "
        "~40 GB of disk, tens of minutes). 'full' measures the tiny scale first too, so the table "
        "shows memory at both sizes from the same run (skip with --no-tiny).",
    )
    p.add_argument("--no-tiny", action="store_true", help="with --scale full: do not also measure the tiny scale")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    p.add_argument(
        "--workdir", type=Path, default=HERE / "work", help="where inputs and outputs go (default bench/work)"
    )
    p.add_argument(
        "--diffusers-src",
        type=Path,
        default=None,
        help="use this existing fp16-variant SDXL base diffusers folder as the input of the largest scale "
        "instead of generating one",
    )
    p.add_argument(
        "--cases", default=None, help=f"comma-separated subset of: {', '.join(c.key for c in cases_mod.CASES)}"
    )
    p.add_argument("--verify", action="store_true", help="also run one `sdxl-ckpt verify` per repeat")
    p.add_argument(
        "--cache",
        choices=("warm", "cold"),
        default="warm",
        help="page-cache state of each case's input before it runs (default warm: read just before)",
    )
    p.add_argument("--interval", type=float, default=0.02, help="memory sampling interval in seconds (default 0.02)")
    p.add_argument(
        "--mem-cap-gb",
        type=float,
        default=None,
        help="kill a case whose process tree passes this RSS (default: 80%% of MemAvailable before each run)",
    )
    p.add_argument("--out-md", type=Path, default=HERE / "results.md")
    p.add_argument("--out-json", type=Path, default=HERE / "results.json")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scales = ["tiny", "full"] if args.scale == "full" and not args.no_tiny else [args.scale]
    try:
        selected = cases_mod.select(args.cases.split(",") if args.cases else None, args.verify)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = Config(
        scales=scales,
        workdir=args.workdir.resolve(),
        repeat=args.repeat,
        cache=args.cache,
        interval=args.interval,
        cap_bytes=int(args.mem_cap_gb * 1e9) if args.mem_cap_gb else None,
        diffusers_src={args.scale: args.diffusers_src} if args.diffusers_src else {},
    )
    try:
        results = run(selected, cfg)
    except InputBuildError as exc:
        print(f"error: could not make the inputs: {exc}", file=sys.stderr)
        return 2
    write_results(results, args.out_md, args.out_json)
    print(render_markdown(results))
    print(f"\nwritten: {args.out_md} and {args.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
