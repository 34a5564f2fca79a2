"""Progress bars on stderr (tqdm), silenced by ``--quiet``; one place so every command looks the same."""

from __future__ import annotations

import sys

from tqdm import tqdm


def byte_bar(total: int, desc: str, quiet: bool) -> tqdm:
    """A bar counting bytes; ``update(n)`` after each tensor."""
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


def step_bar(total: int, desc: str, quiet: bool) -> tqdm:
    """A bar counting steps (sampler steps, stages)."""
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)
