"""One evaluation of the FULL-SIZE SDXL base UNet on this machine's CPU: our MindSpore runtime vs diffusers.

    python -m bench.unet_full_cpu            # both sides, one after the other, each in its own process
    python -m bench.unet_full_cpu --tiny     # the same on the tiny SDXL-shaped UNet (seconds; checks the script)

Each side runs in a fresh process (watched by ``bench.procmem.run_measured`` for its peak memory) and:
builds the UNet, fills every weight with the same deterministic random values (seeded by the parameter's
MindSpore name, so diffusers' ``down_blocks.1.attentions.0...`` and our ``input_blocks.4.1...`` get identical
tensors), then times one evaluation at batch 1, fp32, 64x64 latent (a 512 px image) on the same inputs, and
saves its output. The parent compares the two outputs (relative L2) and writes ``bench/results_unet_full.json``
and ``.md``. Each side needs about 11 GB of RAM: the parent refuses to start one when less is available.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results_unet_full.json"
RESULTS_MD = HERE / "results_unet_full.md"
FULL = {"latent": 64, "timestep": 500.0, "need_gb": 14}
TINY = {"latent": 16, "timestep": 500.0, "need_gb": 1}


def weight_values(ms_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic random float32 values for one parameter, the same on both sides.

    Uniform noise scaled like a default init (variance 1/fan_in) so activations stay finite through 70
    transformer blocks; norm gains around 1, biases small.
    """
    n = math.prod(shape)
    u = np.random.default_rng(zlib.crc32(ms_name.encode())).random(n, dtype=np.float32)
    u = (u - np.float32(0.5)) * np.float32(2.0)  # [-1, 1)
    if ms_name.endswith(".gamma"):
        values = np.float32(1.0) + np.float32(0.1) * u
    elif len(shape) == 1:
        values = np.float32(0.05) * u
    else:
        values = u * np.float32(math.sqrt(3.0 / math.prod(shape[1:])))
    return values.reshape(shape)


def inputs(scale: dict[str, Any], context_dim: int, pooled_dim: int) -> dict[str, np.ndarray]:
    """x, t, context, pooled text embedding and SDXL's six size/crop ids (1024x1024, no crop)."""
    rng = np.random.default_rng(2024)
    size = scale["latent"]
    return {
        "x": rng.standard_normal((1, 4, size, size)).astype(np.float32),
        "t": np.array([scale["timestep"]], dtype=np.float32),
        "context": rng.standard_normal((1, 77, context_dim)).astype(np.float32),
        "pooled": rng.standard_normal((1, pooled_dim)).astype(np.float32),
        "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], dtype=np.float32),
    }


def _pooled_dim(config: dict[str, Any]) -> int:
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def _unet_config(tiny: bool) -> dict[str, Any]:
    from sdxl_ckpt.sdxl.configs import full_configs
    from sdxl_ckpt.testmodels.tiny import tiny_configs

    return (tiny_configs if tiny else full_configs)("base")["unet"]


def run_ours(tiny: bool, repeat: int) -> dict[str, Any]:
    """Build our UNet (parameters created lazily), fill it, evaluate."""
    from mindspore import Tensor, ops

    from sdxl_ckpt.sdxl_runtime.config import unet_config_from_diffusers
    from sdxl_ckpt.sdxl_runtime.device import Runtime, configure
    from sdxl_ckpt.sdxl_runtime.layers import timestep_embedding
    from sdxl_ckpt.sdxl_runtime.unet import UNetModel

    configure("CPU")
    cfg = unet_config_from_diffusers(_unet_config(tiny))
    t0 = time.perf_counter()
    unet = UNetModel(cfg, Runtime("CPU", "fp32"))
    t1 = time.perf_counter()
    for name, param in unet.parameters_and_names():
        param.set_data(Tensor(weight_values("model.diffusion_model." + name, tuple(param.shape))))
    t2 = time.perf_counter()
    config = _unet_config(tiny)
    data = inputs(TINY if tiny else FULL, cfg.context_dim, _pooled_dim(config))
    # y = [pooled | cos-first embedding of each size id], what diffusers builds from (text_embeds, time_ids)
    ids_emb = timestep_embedding(Tensor(data["time_ids"].reshape(-1)), cfg.addition_time_embed_dim).reshape(1, -1)
    y = ops.cat([Tensor(data["pooled"]), ids_emb], axis=-1)
    args = [Tensor(data["x"]), Tensor(data["t"]), Tensor(data["context"]), y]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = unet(*args).asnumpy()
        times.append(time.perf_counter() - start)
    return {"build_s": t1 - t0, "fill_s": t2 - t1, "eval_s": times, "out": out}


def run_diffusers(tiny: bool, repeat: int) -> dict[str, Any]:
    """Build diffusers' UNet2DConditionModel, fill it with the same values (by MindSpore name), evaluate."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxl_ckpt.keymaps.diffusers_sd import map_component_keys
    from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name

    config = _unet_config(tiny)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(config).eval()
    t1 = time.perf_counter()
    params = dict(unet.named_parameters())
    mapping = map_component_keys("unet", list(params), config, "model.diffusion_model.")
    assert not mapping.unknown and not mapping.missing, (mapping.unknown[:3], mapping.missing[:3])
    with torch.no_grad():
        for target in mapping.targets:
            (source,) = target.sources
            ms_name, _ = sd_to_ms_name(target.name)
            params[source].copy_(torch.from_numpy(weight_values(ms_name, tuple(params[source].shape))))
    t2 = time.perf_counter()
    data = inputs(TINY if tiny else FULL, config["cross_attention_dim"], _pooled_dim(config))
    kwargs = {
        "added_cond_kwargs": {
            "text_embeds": torch.from_numpy(data["pooled"]),
            "time_ids": torch.from_numpy(data["time_ids"]),
        }
    }
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            out = unet(
                torch.from_numpy(data["x"]),
                torch.from_numpy(data["t"]),
                encoder_hidden_states=torch.from_numpy(data["context"]),
                **kwargs,
            ).sample.numpy()
            times.append(time.perf_counter() - start)
    return {
        "build_s": t1 - t0,
        "fill_s": t2 - t1,
        "eval_s": times,
        "out": out,
        "torch_threads": torch.get_num_threads(),
    }


def child(side: str, tiny: bool, repeat: int, out_dir: Path) -> None:
    result = (run_ours if side == "ours" else run_diffusers)(tiny, repeat)
    np.save(out_dir / f"{side}_out.npy", result.pop("out"))
    result["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out_dir / f"{side}.json").write_text(json.dumps(result, indent=2))


def _markdown(report: dict[str, Any]) -> str:
    gib = 1024**3
    lines = [
        f"# One SDXL base UNet evaluation on CPU ({report['scale']})",
        "",
        f"Batch 1, fp32, {report['latent']}x{report['latent']} latent, timestep {report['timestep']}, "
        "random weights (identical on both sides). Each side in its own process; peak = the kernel's VmHWM.",
        "",
        "| side | build s | fill weights s | evaluation s | peak RSS GiB | load avg before / after |",
        "|---|---|---|---|---|---|",
    ]
    for side in ("ours", "diffusers"):
        r = report["sides"].get(side)
        if r is None:
            continue
        if not r.get("ok", False):
            lines.append(f"| {side} | failed: {r.get('error', '')[:80]} | | | | |")
            continue
        evals = ", ".join(f"{t:.1f}" for t in r["eval_s"])
        lines.append(
            f"| {side} ({r['framework']}) | {r['build_s']:.1f} | {r['fill_s']:.1f} | {evals} | "
            f"{r['peak_hwm_bytes'] / gib:.2f} | {r['load_before'][0]} / {r['load_after'][0]} |"
        )
    m = report["machine"]
    lines += [
        "",
        f"Agreement of the two outputs: relative L2 {report.get('rel_l2', 'n/a')}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram'] / gib:.1f} GiB RAM; load average before "
        f"the runs {report['load_before']}. MindSpore {m['versions'].get('mindspore')}, torch "
        f"{report.get('torch')}, diffusers {report.get('diffusers')}.",
        "The first evaluation includes each framework's warm-up. Our CPU convolutions run as MindSpore's unfold "
        "(im2col) + one MatMul per image (MindSpore's CPU Conv2D kernel is ~0.5 GFLOP/s) and kernels launch "
        "synchronously "
        "(mindspore.runtime.launch_blocking). The machine is shared (2 cores): compare with the load columns.",
    ]
    return "\n".join(lines) + "\n"


def parent(tiny: bool, repeat: int, sides: list[str], force: bool) -> int:
    from importlib import metadata

    from bench.machine import describe, mem_available
    from bench.procmem import run_measured

    scale = TINY if tiny else FULL
    work = HERE / "work" / ("unet_tiny" if tiny else "unet_full")
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "scale": "tiny SDXL-shaped UNet" if tiny else "full-size SDXL base UNet",
        "latent": scale["latent"],
        "timestep": scale["timestep"],
        "repeat": repeat,
        "machine": describe(work),
        "load_before": [round(v, 2) for v in os.getloadavg()],
        "torch": metadata.version("torch"),
        "diffusers": metadata.version("diffusers"),
        "sides": {},
    }
    for side in sides:
        free = mem_available() or 0
        if free < scale["need_gb"] * 1024**3 and not force:
            report["sides"][side] = {"ok": False, "error": f"only {free / 1024**3:.1f} GiB available"}
            continue
        argv = [
            sys.executable,
            "-m",
            "bench.unet_full_cpu",
            "--child",
            side,
            "--repeat",
            str(repeat),
            "--work",
            str(work),
        ] + (["--tiny"] if tiny else [])
        load = [round(v, 2) for v in os.getloadavg()]
        m = run_measured(argv, log_dir=work / side, cap_bytes=20 * 1024**3, cwd=HERE.parent)
        entry: dict[str, Any] = {
            "ok": m.ok,
            "load_before": load,
            "load_after": [round(v, 2) for v in os.getloadavg()],
            "wall_s": m.wall_s,
            "peak_hwm_bytes": m.peak_hwm,
            "peak_total_bytes": m.peak_total,
            "framework": "MindSpore" if side == "ours" else "PyTorch/diffusers",
        }
        if m.ok:
            entry.update(json.loads((work / f"{side}.json").read_text()))
        else:
            entry["error"] = m.stderr_tail[-500:] or ("exceeded the memory cap" if m.exceeded_cap else "failed")
        report["sides"][side] = entry
    if all(report["sides"].get(s, {}).get("ok") for s in ("ours", "diffusers")):
        a, b = np.load(work / "ours_out.npy"), np.load(work / "diffusers_out.npy")
        report["rel_l2"] = float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))
    out_json = RESULTS_JSON if not tiny else work / "results.json"
    out_md = RESULTS_MD if not tiny else work / "results.md"
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_md.write_text(_markdown(report))
    print(_markdown(report))
    return 0 if all(report["sides"][s].get("ok") for s in sides) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL-shaped UNet (checks the script quickly)")
    ap.add_argument("--repeat", type=int, default=1, help="evaluations per side (the first includes warm-up)")
    ap.add_argument("--sides", default="ours,diffusers")
    ap.add_argument("--force", action="store_true", help="run even when little memory is available")
    ap.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.tiny, args.repeat, args.work)
        return 0
    return parent(args.tiny, args.repeat, args.sides.split(","), args.force)


if __name__ == "__main__":
    sys.exit(main())
