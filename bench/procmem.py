"""Run one command and watch its whole process tree's memory from /proc, anonymous and file-backed apart.

Why both: a converter that mmaps its input shows the input's page-cache pages as ``RssFile`` (cheap to drop,
shared with the cache) while a converter that builds arrays shows them as ``RssAnon`` (real memory that can run
a machine out of RAM). ``VmHWM`` is the kernel's own per-process high-water mark, so a spike between two samples
still counts (only one in the last ~20 ms before exit could be missed); the sampled tree sums give the split and
include helper processes (``sh`` -> ``cat``). ``ru_maxrss`` from ``wait4`` is NOT used: Linux carries the
forking parent's high-water mark into the child's across ``exec``, so it would report the bench's own size.

A memory cap protects a shared machine: when the tree's total RSS passes it, the process group is killed and
the run is recorded as "exceeded the cap" rather than letting the kernel's OOM killer pick a victim.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM")


def read_status(pid: int) -> dict[str, int] | None:
    """The memory fields of /proc/PID/status in bytes; None when the process is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            out[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return out if "RssAnon" in out else None


def _parent_map() -> dict[int, int]:
    """pid -> ppid for every process (Linux without /proc/PID/task/TID/children needs the full scan)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields start after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            parents[int(name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass
class Measurement:
    """One run of one command: wall time, exit status and memory peaks (bytes)."""

    argv: list[str]
    wall_s: float = 0.0
    returncode: int | None = None
    peak_anon: int = 0  # max over samples of the tree's summed RssAnon
    peak_file: int = 0  # max over samples of the tree's summed RssFile
    peak_shmem: int = 0
    peak_total: int = 0  # max over samples of the tree's summed RssAnon + RssFile + RssShmem
    peak_hwm: int = 0  # max per-process VmHWM seen (the kernel's high-water mark, read at each sample)
    samples: int = 0
    cap_bytes: int | None = None
    exceeded_cap: bool = False
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.exceeded_cap

    def as_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def run_measured(
    argv: list[str],
    *,
    log_dir: Path,
    interval: float = 0.02,
    cap_bytes: int | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    tree_every: int = 5,
) -> Measurement:
    """Run ``argv`` to completion, sampling its process tree; never raises for a failing command.

    The child gets ``oom_score_adj`` 1000 so that, should the machine run out of memory anyway, the kernel
    kills the benchmarked command and not a neighbour. Wall time comes from a thread blocked in ``waitpid`` (not
    from the sampling loop), so its resolution does not depend on ``interval``. ``env`` None: this environment
    without ``PYTHONDONTWRITEBYTECODE``, so the command runs as an installed one does, from Python's bytecode
    cache (with it set, every run would recompile every module it imports, ~0.3 s of a tiny conversion).
    """
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    log_dir.mkdir(parents=True, exist_ok=True)
    m = Measurement(argv=list(argv), cap_bytes=cap_bytes)
    out_log, err_log = log_dir / "stdout.log", log_dir / "stderr.log"
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )
    try:
        Path(f"/proc/{proc.pid}/oom_score_adj").write_text("1000")
    except OSError:
        pass
    done: dict = {}

    def reap() -> None:
        _pid, status = os.waitpid(proc.pid, 0)
        done["end"] = time.perf_counter()
        done["status"] = status

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    hwm: dict[int, int] = {}
    tree = [proc.pid]
    tick = 0
    while waiter.is_alive():
        if tick % tree_every == 0:
            tree = process_tree(proc.pid)
        tick += 1
        anon = file = shmem = 0
        for pid in tree:
            st = read_status(pid)
            if st is None:
                continue
            anon += st.get("RssAnon", 0)
            file += st.get("RssFile", 0)
            shmem += st.get("RssShmem", 0)
            hwm[pid] = max(hwm.get(pid, 0), st.get("VmHWM", 0))
        total = anon + file + shmem
        m.samples += 1
        m.peak_anon, m.peak_file = max(m.peak_anon, anon), max(m.peak_file, file)
        m.peak_shmem, m.peak_total = max(m.peak_shmem, shmem), max(m.peak_total, total)
        if cap_bytes is not None and total > cap_bytes and not m.exceeded_cap:
            m.exceeded_cap = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        waiter.join(interval)
    waiter.join()
    proc.returncode = os.waitstatus_to_exitcode(done["status"])  # tell Popen it was reaped
    m.wall_s = done["end"] - start
    m.returncode = proc.returncode
    m.peak_hwm = max(hwm.values(), default=0)
    if not m.ok:
        m.stderr_tail = _tail(err_log)
    return m
