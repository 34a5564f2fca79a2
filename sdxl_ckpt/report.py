"""Results as a short table on stdout and the same data as JSON (``--json``): one format for every command."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table; numbers right-aligned, floats shown with 4 significant digits."""
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value)
        return "" if value is None else str(value)

    text = [[cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) for c in cols]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in text)])


def key_listing(title: str, keys: Sequence[str], shown: int = 20) -> list[str]:
    """``title (n):`` and the first ``shown`` keys indented, then how many more the JSON report holds; [] if none."""
    if not keys:
        return []
    lines = [f"{title} ({len(keys)}):"] + [f"  {k}" for k in keys[:shown]]
    if len(keys) > shown:
        lines.append(f"  ... and {len(keys) - shown} more (see --json)")
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


@contextmanager
def error_report(command: str, json_out: str | os.PathLike | None) -> Iterator[None]:
    """On an error listing problems, write all of them to ``--json FILE`` (the message shows the first few)."""
    from sdxl_ckpt.errors import SdxlCkptError

    try:
        yield
    except SdxlCkptError as err:
        if err.problems and json_out is not None and str(json_out) != "-":
            write_json({"command": command, "error": str(err), "problems": err.problems}, json_out)
        raise


def write_json(report: Mapping[str, Any], path: str | os.PathLike | None) -> None:
    """Write ``report`` as JSON to ``path`` (``-`` for stdout); nothing when ``path`` is None."""
    if path is None:
        return
    text = json.dumps(_jsonable(report), indent=2, sort_keys=False)
    if str(path) == "-":
        print(text)
    else:
        try:
            Path(path).write_text(text + "\n")
        except OSError as exc:  # a report that cannot be written is an output error, not a traceback
            from sdxl_ckpt.errors import OutputWriteError

            raise OutputWriteError(f"cannot write the JSON report: {exc.strerror}", path=path) from None
