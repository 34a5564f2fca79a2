"""mindone's key-list format (``name:(shape)`` per line, two files paired by line number), read and written.

mindone's converter pairs ``torch_key_*.yaml`` with ``mindspore_key_*.yaml`` by line position and ignores the
shape column. We accept those lists, but check every pair by name (the rename must be the one our rules give),
every shape column against the input, and every name for malformations (e.g. the ``..`` in mindone's stored
base list); ``keymaps export --format mindone`` writes our maps in the same format so the two can be diffed.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps import Keymap
from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name

NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class ListedKey:
    line: int
    name: str
    shape: tuple[int, ...] | None  # None: the shape column is missing or unreadable


def _shape(text: str) -> tuple[int, ...] | None:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    return None


def read_list(path: str | os.PathLike) -> list[ListedKey]:
    """The non-empty lines of a mindone key list (``name:(shape)``; a line without ``:`` has no shape)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("key list not found", path=path)
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        name, sep, rest = line.partition(":")
        out.append(ListedKey(number, name.strip(), _shape(rest) if sep else None))
    return out


def format_shape(shape: Iterable[int]) -> str:
    """Python's tuple spelling, as mindone writes it: ``(1280, 320)``, ``(1280,)``, ``()``."""
    return str(tuple(int(d) for d in shape))


def export_lists(keymap: Keymap) -> tuple[str, str]:
    """(torch list, mindspore list) texts of the REQUIRED keys of ``keymap``, paired line by line."""
    specs = [s for s in keymap.specs if s.required and s.ms is not None]
    torch_text = "".join(f"{s.sd}:{format_shape(s.shape)}\n" for s in specs)
    ms_text = "".join(f"{s.ms}:{format_shape(s.shape)}\n" for s in specs)
    return torch_text, ms_text


def check_lists(
    torch_list: list[ListedKey],
    ms_list: list[ListedKey],
    shapes: Mapping[str, tuple[int, ...]],
    skippable: Mapping[str, str],
    torch_path: object,
    ms_path: object,
) -> list[tuple[str | None, str]]:
    """Every problem with a (torch, mindspore) list pair for an input with these SD key shapes: (key, message).

    ``skippable``: SD key -> why a list may leave it out (optional keys, keys that are no MindSpore parameter)."""
    problems: list[tuple[str | None, str]] = []
    if len(torch_list) != len(ms_list):
        problems.append(
            (
                None,
                f"{torch_path} has {len(torch_list)} keys and {ms_path} {len(ms_list)}: "
                "the lists are paired line by line",
            )
        )
    for listed, where in ((torch_list, torch_path), (ms_list, ms_path)):
        for item in listed:
            if not NAME.fullmatch(item.name):
                problems.append((item.name, f"{where} line {item.line}: malformed name (empty or invalid part)"))
            if item.shape is None:
                problems.append((item.name, f"{where} line {item.line}: no readable (shape) column"))
    covered = set()
    for t, m in zip(torch_list, ms_list):
        covered.add(t.name)
        if t.name not in shapes:
            problems.append((t.name, f"{torch_path} line {t.line}: not in the input"))
        elif t.shape is not None and t.shape != tuple(shapes[t.name]):
            problems.append(
                (t.name, f"{torch_path} line {t.line}: list says {list(t.shape)}, input has {list(shapes[t.name])}")
            )
        expected, _rule = sd_to_ms_name(t.name)
        if expected is None:
            problems.append(
                (
                    t.name,
                    f"line {t.line}: this key is not a MindSpore parameter (dropped: {_rule.why})",
                )
            )
        elif m.name != expected:
            problems.append((t.name, f"line {t.line} pairs it with {m.name!r}; the rename rules give {expected!r}"))
        if t.shape is not None and m.shape is not None and t.shape != m.shape:
            problems.append(
                (
                    m.name,
                    f"{ms_path} line {m.line}: shape {list(m.shape)} differs from its torch pair "
                    f"{list(t.shape)} (SD -> MindSpore never reshapes)",
                )
            )
    for name in shapes:
        if name not in covered and name not in skippable:
            problems.append((name, f"in the input but not in {torch_path}"))
    return problems


def write_export(variant: str, fmt: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write ``torch_key_{variant}.yaml`` and ``mindspore_key_{variant}.yaml`` into ``out_dir``; returns the paths."""
    from sdxl_ckpt.formats.atomic import atomic_output, check_output
    from sdxl_ckpt.keymaps import load_keymap

    if fmt != "mindone":
        raise InputError(f"--format must be 'mindone', not {fmt!r}")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder", path=folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: exporting into a new folder is the usual case
    except OSError as exc:
        from sdxl_ckpt.errors import OutputWriteError

        raise OutputWriteError(f"cannot create the folder: {exc.strerror}", path=folder) from None
    texts = dict(zip(("torch", "mindspore"), export_lists(load_keymap(variant))))
    paths = {kind: folder / f"{kind}_key_{variant}.yaml" for kind in texts}
    for path in paths.values():
        check_output(path, overwrite)
    for kind, path in paths.items():
        with atomic_output(path, overwrite) as handle:
            handle.write(texts[kind].encode("utf-8"))
    return list(paths.values())
