"""Rename-rule templates (``re`` replacement strings such as ``\\g<p>.gamma``), expanded fast.

``Match.expand`` re-parses its template on every call (Python 3.11): over SDXL's ~2,500 keys, several tables per
command, that alone was the largest cost of a tiny conversion. A template is parsed once into literal text and
group references.
"""

from __future__ import annotations

import re
from functools import lru_cache

_GROUP_REF = re.compile(r"\\g<(\w+)>")


@lru_cache(maxsize=4096)
def _template(replacement: str) -> tuple[tuple[str | int, bool], ...] | None:
    """(text, is a group reference) parts; None when the template has other escapes than ``\\g<name>`` / ``\\g<N>``."""
    parts: list[tuple[str | int, bool]] = []
    last = 0
    for ref in _GROUP_REF.finditer(replacement):
        group = ref.group(1)
        parts += [(replacement[last : ref.start()], False), (int(group) if group.isdigit() else group, True)]
        last = ref.end()
    parts.append((replacement[last:], False))
    if any("\\" in str(text) for text, is_group in parts if not is_group):
        return None
    return tuple(parts)


def expand_template(match: re.Match[str], replacement: str) -> str:
    """``match.expand(replacement)``, with the template parsed once."""
    parts = _template(replacement)
    if parts is None:
        return match.expand(replacement)
    return "".join(match.group(text) if is_group else text for text, is_group in parts)  # type: ignore[misc]
