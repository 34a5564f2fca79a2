"""The bench results as markdown (results.md) and JSON (results.json): the same numbers, two audiences.

Sizes are decimal (MB = 10^6 bytes, GB = 10^9) because the targets are stated that way ("< 1.5 GB").
"""

from __future__ import annotations

import time
from pathlib import Path

from sdxl_ckpt.report import write_json

TABLE_COLUMNS = (
    "scale",
    "case",
    "status",
    "runs",
    "wall median",
    "min",
    "max",
    "x copy",
    "peak RssAnon",
    "peak RssFile",
    "peak RSS",
    "output",
    "input cached",
)


def mb(n: int | float | None) -> str:
    return "" if n is None else f"{n / 1e6:,.0f} MB"


def gb(n: int | float | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def secs(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f} %"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    return [_row(list(header)), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def results_rows(results: dict) -> list[list[str]]:
    rows = []
    for scale, data in results["scales"].items():
        for s in data["cases"].values():
            runs = f"{s['runs_ok']}/{len(s['runs'])}"
            at_least = ">= " if s["status"] == "exceeded memory cap" else ""
            rows.append(
                [
                    scale,
                    s["title"],
                    s["status"],
                    runs,
                    secs(s["wall_median"]),
                    secs(s["wall_min"]),
                    secs(s["wall_max"]),
                    ratio(s.get("ratio_to_copy")),
                    at_least + mb(s["peak_anon"]),
                    mb(s["peak_file"]),
                    at_least + mb(s["peak_rss"]),
                    gb(s["output_bytes"]),
                    pct(s["resident_min"]),
                ]
            )
    return rows


def flat_rows(results: dict) -> list[list[str]]:
    """Peak memory of each conversion at tiny and full size side by side (only when both scales ran)."""
    scales = results["scales"]
    if not {"tiny", "full"} <= set(scales):
        return []
    big = {scale: scales[scale].get("largest_tensor", {}).get("bytes") for scale in ("tiny", "full")}
    rows = []
    for key, full in scales["full"]["cases"].items():
        tiny = scales["tiny"]["cases"].get(key)
        if full["kind"] in ("copy", "startup") or tiny is None or full["peak_rss"] is None or not tiny["peak_rss"]:
            continue
        at_least = ">= " if full["status"] == "exceeded memory cap" else ""  # killed: the true peak is higher
        rows.append(
            [
                full["title"],
                gb(tiny["input_bytes"]),
                mb(tiny["peak_anon"]),
                mb(tiny["peak_rss"]),
                gb(full["input_bytes"]),
                at_least + mb(full["peak_anon"]),
                at_least + mb(full["peak_rss"]),
                f"{full['input_bytes'] / tiny['input_bytes']:.0f}x",
                at_least + ratio(full["peak_rss"] / tiny["peak_rss"]),
                f"{mb(big['tiny'])} / {mb(big['full'])}",
            ]
        )
    return rows


def target_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results["targets"]:
        if "RSS" in t["what"]:
            value, limit = mb(t["value"]), mb(t["limit"])
        elif t["scale"] == "tiny":
            value, limit = (f"{t['value']:.2f} s" if t["value"] is not None else None), f"{t['limit']:g} s"
        else:
            value, limit = ratio(t["value"]), ratio(t["limit"])
        met = {True: "yes", False: "**NO**", None: "not judged"}[t["met"]]
        rows.append([t["case"], t["what"], value or "n/a", limit, met])
    return rows


def machine_lines(results: dict) -> list[str]:
    m, cfg = results["machine"], results["config"]
    disk = m["disk"]
    kind = {True: "rotational", False: "non-rotational", None: "unknown type"}[disk["rotational"]]
    v = m["versions"]
    return [
        f"- CPU: {m['cpu']}, {m['cores']} cores; RAM {gb(m['ram'])} ({gb(m['ram_available'])} available at start), "
        f"swap {gb(m['swap'])}",
        f"- Disk: {disk['device'] or '?'} ({kind}), filesystem {gb(disk['size'])}, {gb(disk['free'])} free at start",
        f"- Kernel {m['kernel']}; Python {m['python']}; mindspore {v.get('mindspore')}, numpy {v.get('numpy')}, "
        f"safetensors {v.get('safetensors')}, sdxl-ckpt {v.get('sdxl-ckpt')}",
        f"- Load average at start {m['load_avg'][0]:.2f}, at end {results['load_avg_end'][0]:.2f} "
        f"(other work on the machine shows up here)",
        f"- Each case {cfg['repeat']}x, round-robin ('x copy' = median over rounds of the run's time over the same "
        f"round's plain copy of its input); `sync` before every run; page cache: **{cfg['cache']}** (input "
        + ("read once just before every run" if cfg["cache"] == "warm" else "pages dropped before every run")
        + "; 'input cached' is the share the kernel reported resident, minimum over runs); memory sampled every "
        f"{cfg['interval_s'] * 1000:.0f} ms over the whole process tree, peak RSS = max(sampled Anon+File+Shmem, "
        "per-process kernel VmHWM)",
    ]


def _note(scale: str, s: dict) -> str:
    """Why a case is not "ok", in one line: the cap it passed, or the last line its command printed."""
    text = f"- {s['title']} ({scale}): {s['status']}"
    if s["status"] == "exceeded memory cap":
        killed = [r for r in s["runs"] if r["exceeded_cap"]]
        text += (
            f" in {len(killed)} of {len(s['runs'])} runs: killed by the bench when its RSS passed the "
            f"memory cap of {gb(s['cap_bytes'])}, after {secs(killed[0]['wall_s'])}: it needs more RAM "
            "than this machine had free"
        )
    elif s["error"]:
        text += ": " + s["error"].strip().splitlines()[-1]
    return text


def render_markdown(results: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(results.get("finished", time.time())))
    lines = [
        f"# sdxl-ckpt bench results ({when})",
        "",
        "## Machine",
        "",
        *machine_lines(results),
        "",
        "## Results",
        "",
        *_table(TABLE_COLUMNS, results_rows(results)),
        "",
    ]
    flat = flat_rows(results)
    if flat:
        lines += [
            "## Memory as the model grows (tiny vs full)",
            "",
            *_table(
                (
                    "case",
                    "tiny input",
                    "tiny RssAnon",
                    "tiny peak RSS",
                    "full input",
                    "full RssAnon",
                    "full peak RSS",
                    "input grows",
                    "peak RSS grows",
                    "largest tensor tiny / full",
                ),
                flat,
            ),
            "",
            "A streaming converter holds about one tensor at a time (plus its cast copy): its peak follows the "
            "largest tensor, not the model; the baseline's follows the model.",
            "",
        ]
    targets = target_rows(results)
    if targets:
        lines += ["## Targets", "", *_table(("case", "target", "measured", "limit", "met"), targets), ""]
    notes = [
        _note(scale, s)
        for scale, data in results["scales"].items()
        for s in data["cases"].values()
        if s["status"] != "ok"
    ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def write_results(results: dict, md_path: Path, json_path: Path) -> None:
    results.setdefault("finished", time.time())
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(results))
    write_json(results, json_path)
