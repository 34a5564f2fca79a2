"""The bench harness at tiny scale: it runs every case through the real CLI and writes a well-formed table.

No timing is asserted (CI machines vary); what is asserted is structure and facts that do not depend on speed:
the memory sampler sees an allocation, the cap kills a runaway command, a plain copy writes exactly its input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import commands, pagecache
from bench.__main__ import main as bench_main
from bench.cases import CHECK_RSS_TARGET, DEFAULT_KEYS, VERIFY_TARGET, select
from bench.procmem import run_measured
from bench.tables import TABLE_COLUMNS

ALLOC = 200_000_000


def test_sampler_sees_anonymous_memory(tmp_path):
    code = f"import time; b = bytearray({ALLOC}); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
    m = run_measured([sys.executable, "-c", code], log_dir=tmp_path)
    assert m.ok and m.samples > 0
    assert m.peak_anon >= ALLOC and m.peak_hwm >= ALLOC
    assert m.peak_total >= m.peak_anon and m.peak_file > 0  # the interpreter's own mapped files


def test_cap_kills_runaway_command(tmp_path):
    code = f"import time; b = bytearray({ALLOC}); b[::4096] = b'x' * len(b[::4096]); time.sleep(5)"
    m = run_measured([sys.executable, "-c", code], log_dir=tmp_path, cap_bytes=ALLOC // 2)
    assert m.exceeded_cap and not m.ok and m.wall_s < 5


def test_verify_is_timed_against_the_reference_run():
    """--verify adds the torch reference and verify; verify's ratio pairs it with the same round's reference run
    and both are judged on peak RSS (full size only)."""
    from bench.runner import add_ratios, evaluate_targets

    assert [c.key for c in select(None, with_verify=True)][-2:] == ["reference", "verify"]
    by_key = {c.key: c for c in select(["reference", "verify"], with_verify=False)}
    summaries = {
        "reference": {"reference": None, "runs": [{"rep": 0, "ok": True, "wall_s": 40.0}], "wall_median": 40.0},
        "verify": {
            "reference": by_key["verify"].reference,
            "runs": [{"rep": 0, "ok": True, "wall_s": 50.0}],
            "wall_median": 50.0,
        },
    }
    add_ratios(summaries)
    assert summaries["verify"]["ratio_to_copy"] == pytest.approx(1.25)
    for s, peak in zip(summaries.values(), (11e9, 13e9)):
        s.update(status="ok", peak_rss=peak)
    targets = {(t["case"], t["what"]): t["met"] for t in evaluate_targets({"full": {"cases": summaries}})}
    assert targets == {
        ("reference", f"peak RSS < {CHECK_RSS_TARGET / 1e9:g} GB"): True,
        ("verify", f"wall <= {VERIFY_TARGET}x the reference run"): False,
        ("verify", f"peak RSS < {CHECK_RSS_TARGET / 1e9:g} GB"): False,
    }


def _fs_type(path: Path) -> str:
    """The filesystem type of the longest /proc/mounts mount point containing ``path``."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def test_page_cache_states(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\1" * 4_000_000)
    assert pagecache.prepare([path], "warm") == pytest.approx(1.0)
    if _fs_type(path) in ("tmpfs", "ramfs"):
        pytest.skip("a RAM filesystem keeps every page: nothing to evict")
    assert pagecache.prepare([path], "cold") < 0.5


def _cli_options(*names: str) -> set[str]:
    import typer

    from sdxl_ckpt.cli import app

    command = typer.main.get_command(app)
    for name in names:  # a group's sub-command: "lora", "merge"
        command = command.commands[name]
    return {opt for param in command.params for opt in param.opts}


def test_command_lines_use_existing_options(tmp_path):
    """Every --flag the bench passes exists on the real command (the CLI may change under the bench)."""
    p = tmp_path / "x"
    lines = [
        commands.generate_model("full", p),
        commands.diffusers_to_sd(p, p, "fp16"),
        commands.st_to_ms(p, p, "fp32"),
        commands.ms_to_st(p, p),
        commands.sd_to_diffusers(p, p),
        commands.reference(p, p, "full"),
        commands.reference(p, p, "full", config=p),
        commands.verify(p, p, p),
        commands.lora_merge(p, p, p),
        commands.lora_convert(p, p, "kohya"),
    ]
    for argv in lines:
        rest = argv[len(commands.cli()) :]
        names = rest[:2] if rest[0] == "lora" else rest[:1]
        flags = {a for a in rest[len(names) :] if a.startswith("-")}
        assert flags <= _cli_options(*names), (names, flags - _cli_options(*names))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One bench run at tiny scale; the fp16 input folder is built in-process (torch is already loaded when the
    suite's other tiny-model tests ran), the rest goes through the real CLI as in a user's run."""
    pytest.importorskip("diffusers")
    from sdxl_ckpt.testmodels.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("bench")
    source = build_tiny_model("base", base / "tiny_fp16", variant_fp16=True)
    md, js = base / "results.md", base / "results.json"
    rc = bench_main(
        [
            "--scale",
            "tiny",
            "--repeat",
            "1",
            "--workdir",
            str(base / "work"),
            "--diffusers-src",
            str(source),
            "--out-md",
            str(md),
            "--out-json",
            str(js),
        ]
    )
    assert rc == 0
    return md.read_text(), json.loads(js.read_text()), base


@pytest.mark.slow  # runs the bench at tiny scale (~4 min on 2 busy cores)
def test_results_table_is_well_formed(tiny_run):
    text, _results, _base = tiny_run
    lines = text.splitlines()
    assert lines[0].startswith("# sdxl-ckpt bench results")
    assert "## Machine" in lines and "## Results" in lines
    start = lines.index("## Results") + 2
    header = lines[start]
    assert [c.strip() for c in header.strip("|").split("|")] == list(TABLE_COLUMNS)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(DEFAULT_KEYS)
    assert all(row.count("|") == header.count("|") for row in rows)
    assert all("| tiny |" in row for row in rows)


@pytest.mark.slow  # runs the bench at tiny scale (~4 min on 2 busy cores)
def test_results_json_matches_cases(tiny_run):
    _text, results, _base = tiny_run
    assert {"machine", "config", "scales", "targets"} <= set(results)
    assert results["machine"]["cores"] >= 1 and results["machine"]["ram"] > 0
    cases = results["scales"]["tiny"]["cases"]
    assert list(cases) == list(DEFAULT_KEYS)
    for key, case in cases.items():
        assert case["status"] == "ok", (key, case["error"])
        assert len(case["runs"]) == 1 and case["wall_median"] > 0
        assert case["peak_rss"] >= case["peak_anon"] > 0
        assert case["kind"] == "startup" or case["output_bytes"] > 0  # `--help` writes no file
        assert case["resident_min"] == pytest.approx(1.0, abs=0.01)  # warm cache, as configured
        if case["reference"]:
            assert case["ratio_to_copy"] > 0
    for key in ("copy_diffusers", "copy_sd", "dd_sd", "copy_ckpt"):  # a copy writes exactly its input
        assert cases[key]["output_bytes"] == cases[key]["input_bytes"]
    # fp32 output is twice the fp16 input's tensor bytes, give or take headers
    assert cases["st_to_ms_fp32"]["output_bytes"] > 1.9 * cases["st_to_ms_keep"]["output_bytes"]
    assert cases["copy_sd_twice"]["output_bytes"] == 2 * cases["copy_sd_twice"]["input_bytes"]
    startup = [t for t in results["targets"] if t["what"].startswith("tiny: wall")]
    assert {t["case"] for t in startup} >= {"startup_help", "st_to_ms_keep"}
    assert all(t["met"] is not None for t in startup)  # start-up is a tiny-scale target
    assert all(t["met"] is None for t in results["targets"] if t not in startup)  # copy ratios, memory: full only


@pytest.mark.slow  # runs the bench at tiny scale (~4 min on 2 busy cores)
def test_inputs_are_reused(tiny_run):
    _text, _results, base = tiny_run
    manifest = json.loads((base / "work" / "tiny" / "inputs.json").read_text())
    before = dict(manifest["sizes"])
    rc = bench_main(
        [
            "--scale",
            "tiny",
            "--repeat",
            "1",
            "--cases",
            "copy_sd",
            "--workdir",
            str(base / "work"),
            "--diffusers-src",
            str(base / "tiny_fp16"),
            "--out-md",
            str(base / "r2.md"),
            "--out-json",
            str(base / "r2.json"),
        ]
    )
    assert rc == 0
    again = json.loads((base / "work" / "tiny" / "inputs.json").read_text())
    assert again["sizes"] == before and again["created"] == manifest["created"]  # not rebuilt
    assert list(json.loads((base / "r2.json").read_text())["scales"]["tiny"]["cases"]) == ["copy_sd"]
