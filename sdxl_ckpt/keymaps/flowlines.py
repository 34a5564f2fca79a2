"""A fast reader for the keymap YAMLs as ``keymaps.generate`` writes them; None for anything else.

PyYAML (even its C loader) takes ~0.3 s of CPU for one 2,500-key keymap, more than the rest of a tiny conversion's
start-up together. The generated files use a small, fixed subset of YAML: top-level ``name: scalar`` lines,
``name: {...}`` flow maps of plain scalars, and sections (``keys:`` / ``optional:`` / ``dropped:``) whose entries
are ``  key: {field: value, ...}`` with values that are plain words, ``[a, b]`` lists of words or JSON-quoted
strings (``why``). This reader accepts exactly that subset, gives the same Python values PyYAML's safe loader
gives for it (ints for digit words, strings otherwise) and returns None the moment a line falls outside it, so the
caller then parses the file with PyYAML: an edited or unusual file is never misread, only read more slowly.
"""

from __future__ import annotations

import json
import re
from typing import Any

# a plain YAML scalar that the safe loader reads as a string: a word of name characters that is not one of the
# words YAML 1.1 resolves to bool / null / a number
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_INT = re.compile(r"0|[1-9][0-9]*")
_YAML_SPECIAL = frozenset(
    w
    for word in ("y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf")
    for w in (word, word.capitalize(), word.upper())
) | {"~"}
_ENTRY = re.compile(r"  ([A-Za-z_][A-Za-z0-9_.\-]*): \{(.*)\}")
# the entry the generator writes for nearly every key, matched whole in one step (other entries take _flow_map)
_COMMON_ENTRY = re.compile(
    r"  ([A-Za-z_][A-Za-z0-9_.\-]*): \{ms: ([A-Za-z_][A-Za-z0-9_.\-]*), shape: \[((?:[1-9][0-9]*(?:, )?)*)\], "
    r"dims: \[((?:d[0-9]+[a-z]*(?:, )?)*)\], dtype: (float|int)\}"
)
_TOP = re.compile(r"([a-z_]+):(?: (.*))?")


def _scalar(text: str) -> Any:
    """A plain word as the safe loader reads it; raises ValueError outside the subset."""
    if _INT.fullmatch(text):
        return int(text)
    if _WORD.fullmatch(text) and text not in _YAML_SPECIAL:
        return text
    raise ValueError(text)


def _flow_map(body: str) -> dict[str, Any]:
    """``field: value, ...`` (the inside of ``{...}``); raises ValueError outside the subset."""
    out: dict[str, Any] = {}
    pos, end = 0, len(body)
    while pos < end:
        colon = body.find(": ", pos)
        if colon < 0:
            raise ValueError(body)
        name = body[pos:colon]
        if not _WORD.fullmatch(name) or name in out:
            raise ValueError(name)
        pos = colon + 2
        if body.startswith("[", pos):
            close = body.index("]", pos)
            inner = body[pos + 1 : close]
            value: Any = [_scalar(item) for item in inner.split(", ")] if inner else []
            pos = close + 1
        elif body.startswith('"', pos):
            value, pos = json.JSONDecoder().raw_decode(body, pos)
            if not isinstance(value, str) or "\\" in body[colon:pos]:  # escapes: YAML and JSON differ
                raise ValueError(body)
        else:
            comma = body.find(", ", pos)
            stop = end if comma < 0 else comma
            value = _scalar(body[pos:stop])
            pos = stop
        out[name] = value
        if pos < end:
            if not body.startswith(", ", pos):
                raise ValueError(body)
            pos += 2
    return out


def parse_generated(text: str) -> dict[str, Any] | None:
    """The keymap document in ``text`` as PyYAML's safe loader would give it, or None outside the subset."""
    data: dict[str, Any] = {}
    section: dict[str, Any] | None = None
    bare: list[str] = []  # sections written as ``name:``; YAML reads one without entries as null
    try:
        for line in text.split("\n"):
            if not line or line.startswith("#"):
                continue
            if line.startswith("  "):
                common = _COMMON_ENTRY.fullmatch(line)
                if common is not None and section is not None and common.group(2) not in _YAML_SPECIAL:
                    key, ms, shape, dims, dtype = common.groups()
                    if key in section:
                        return None
                    section[key] = {
                        "ms": ms,
                        "shape": [int(n) for n in shape.split(", ")] if shape else [],
                        "dims": dims.split(", ") if dims else [],
                        "dtype": dtype,
                    }
                    continue
                match = _ENTRY.fullmatch(line)
                if section is None or match is None or match.group(1) in section:
                    return None
                section[match.group(1)] = _flow_map(match.group(2))
                continue
            match = _TOP.fullmatch(line)
            if match is None or match.group(1) in data:
                return None
            name, value = match.groups()
            section = None
            if value is None:  # a section: its entries follow
                section = data[name] = {}
                bare.append(name)
            elif value == "{}":
                data[name] = {}
            elif value.startswith("{") and value.endswith("}"):
                data[name] = _flow_map(value[1:-1])
            else:
                data[name] = _scalar(value)
    except ValueError:
        return None
    for name in bare:
        if not data[name]:
            data[name] = None
    return data
