"""What the numbers were measured on: CPU, RAM, disk, load, software versions (a timing without them means little)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def mem_available() -> int | None:
    return _meminfo().get("MemAvailable")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk(path: Path) -> dict:
    """Size/free of the filesystem holding ``path`` and whether the kernel calls its device rotational."""
    usage = shutil.disk_usage(path)
    info: dict = {"path": str(path), "size": usage.total, "free": usage.free, "device": None, "rotational": None}
    try:
        dev = os.stat(path).st_dev
        sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        name = sys_dev.resolve().name
        info["device"] = name
        queue = sys_dev / "queue"
        if not queue.exists():  # a partition: the queue lives on the parent disk
            queue = sys_dev.resolve().parent / "queue"
        info["rotational"] = (queue / "rotational").read_text().strip() == "1"
    except OSError:
        pass
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(workdir: Path) -> dict:
    """A JSON-able description of the machine and software; ``load`` is sampled now (shared machines vary)."""
    mem = _meminfo()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram": mem.get("MemTotal"),
        "ram_available": mem.get("MemAvailable"),
        "swap": mem.get("SwapTotal"),
        "disk": _disk(workdir),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in ("mindspore", "numpy", "safetensors", "sdxl-ckpt")},
        "load_avg": list(os.getloadavg()),
    }
