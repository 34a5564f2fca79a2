"""Files the package ships that are generated from its own tables: write them anew, or check they are current.

The keymaps (``keymaps.generate``) and the LoRA module lists (``lora.index_file``) are data derived from the rule
tables, kept in the repository so that users can read them and commands need not derive them at start-up. Both
generators share this entry point: ``--check`` reports the stale files and exits 1, no option rewrites them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path


def write_or_check(files: Mapping[Path, Callable[[], str]], args: list[str], command: str) -> int:
    """Render every file of ``files`` (path -> its text); with ``--check`` in ``args`` compare, else write."""
    check = "--check" in args
    stale = []
    for path, render in files.items():
        text = render()
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run {command})", file=sys.stderr)
        return 1
    return 0
