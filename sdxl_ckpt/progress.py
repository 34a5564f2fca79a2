"""Progress bars on stderr (tqdm), silenced by ``--quiet``; one place so every command looks the same.

A quiet command gets a do-nothing bar and never imports tqdm (its import costs more than a small conversion).
"""

from __future__ import annotations

import sys
from typing import Any


class _SilentBar:
    """What a disabled tqdm bar does: nothing, with the same calls."""

    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> _SilentBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def byte_bar(total: int, desc: str, quiet: bool) -> Any:
    """A bar counting bytes; ``update(n)`` after each tensor."""
    if quiet:
        return _SilentBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=quiet,
        leave=False,
        dynamic_ncols=True,
    )


def step_bar(total: int, desc: str, quiet: bool) -> Any:
    """A bar counting steps (sampler steps, stages)."""
    if quiet:
        return _SilentBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)


def write_line(line: str) -> None:
    """One line on stderr, above any progress bar that is showing."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:  # no bar was ever made: nothing to keep clear of
        print(line, file=sys.stderr)
    else:
        tqdm.tqdm.write(line, file=sys.stderr)
