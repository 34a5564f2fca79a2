"""SD -> diffusers names: the ``diffusers_sd`` rule tables read backwards, so both directions share one table.

A forward rule is a regex over diffusers keys plus a replacement template. Every pattern in those tables is a
finite language (literal block prefixes, alternations of names, index alternations from the config), so the
inverse is built by enumerating each rule's language and running the rule forward on every string: the SD name
it yields points back to the diffusers key that made it. No rename is written twice. Where a rule accepts
several diffusers spellings of one tensor (the VAE's old ``query`` / ``proj_attn`` names), the first alternative
of the pattern is the one written back (today's diffusers names come first in the tables).

Tensors the SD layout holds and diffusers does not (``diffusers_sd.GENERATED``) are dropped on the way back,
each with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sdxl_ckpt.keymaps.diffusers_sd import (
    GENERATED,
    QKV_ORDER,
    Rule,
    component_rules,
    expected_sd_keys,
)
from sdxl_ckpt.keymaps.templates import expand_template

try:  # the regex parser: re._parser since Python 3.11, sre_parse before
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

# why each generated SD tensor has no diffusers counterpart
GENERATED_BACK: dict[str, str] = {
    "position_ids": "int64 arange buffer: transformers' CLIPTextModel rebuilds it at load (not in its weights)",
    "logit_scale": "CLIP's contrastive temperature: CLIPTextModelWithProjection has no such parameter",
}


def _language(items: Any, pattern: str) -> list[str]:
    """Every string the parsed regex ``items`` fully matches, in pattern order (alternatives first to last)."""
    results = [""]
    for op, av in items:
        if op is _sre.LITERAL:
            options = [chr(av)]
        elif op is _sre.IN:
            options = []
            for kind, value in av:
                if kind is _sre.LITERAL:
                    options.append(chr(value))
                elif kind is _sre.RANGE:
                    options += [chr(c) for c in range(value[0], value[1] + 1)]
                else:
                    raise ValueError(f"rule pattern {pattern!r}: character class {kind} is not enumerable")
        elif op is _sre.SUBPATTERN:
            options = _language(av[-1], pattern)
        elif op is _sre.BRANCH:
            options = [s for branch in av[1] for s in _language(branch, pattern)]
        elif op is _sre.ASSERT_NOT and not list(av[1]):
            options = []  # (?!) matches nothing: a block with no transformer layers
        else:
            raise ValueError(f"rule pattern {pattern!r}: {op} is not enumerable")
        results = [r + o for r in results for o in options]
        if not results:
            return []
    return results


@lru_cache(maxsize=4096)
def rule_language(pattern: str) -> tuple[str, ...]:
    """The diffusers keys a rule pattern accepts (its regex is a finite language by construction)."""
    return tuple(_language(_sre_parse.parse(pattern), pattern))


@dataclass(frozen=True)
class SourceOf:
    """One SD tensor on the way back: its SD name, the diffusers keys it becomes (q, k, v order), the transform."""

    sd: str
    diffusers: tuple[str, ...]
    transform: str


def inverse_rules(rules: Iterable[Rule]) -> dict[str, SourceOf]:
    """SD name -> how it goes back, for every SD name the forward ``rules`` can produce (in rule order)."""
    singles: dict[str, SourceOf] = {}
    parts: dict[str, dict[str, str]] = {}
    order: dict[str, str] = {}  # SD name -> transform, in first-seen order
    for rule in rules:
        if rule.replacement is None:
            continue
        for key in rule_language(rule.pattern):
            match = rule.apply(key)
            if match is None:  # the enumeration and the regex disagree: a pattern feature _language misreads
                raise ValueError(f"rule {rule.pattern!r} does not match its own string {key!r}")
            name = expand_template(match, rule.replacement)
            if rule.transform == "concat_qkv":
                parts.setdefault(name, {}).setdefault(match.group("qkv"), key)
            elif name not in singles:
                singles[name] = SourceOf(name, (key,), rule.transform)
            order.setdefault(name, rule.transform)
    table: dict[str, SourceOf] = {}
    for name, transform in order.items():
        if transform == "concat_qkv":
            got = parts[name]
            if set(got) != set(QKV_ORDER):
                raise ValueError(f"concat rule for {name!r} lacks a q, k or v pattern")
            table[name] = SourceOf(name, tuple(got[p] for p in QKV_ORDER), transform)
        else:
            table[name] = singles[name]
    return table


@dataclass
class InverseMap:
    """Every SD key of a component accounted for: ``targets`` (in rule order), ``dropped`` (SD key -> reason),
    ``unknown`` (no rule produces it: the caller refuses), ``missing`` (required SD keys the file lacks)."""

    component: str
    targets: list[SourceOf] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def map_sd_keys(component: str, sd_keys: Iterable[str], config: Mapping[str, Any], sd_prefix: str) -> InverseMap:
    """Map one component's SD keys (all under ``sd_prefix``) back to diffusers keys; names only, no tensor read."""
    table = inverse_rules(component_rules(component, config, sd_prefix))
    generated = {sd_prefix + key: gen for key, gen in GENERATED.get(component, ())}
    present = set(sd_keys)
    result = InverseMap(component)
    for key in sorted(present - set(table)):
        if key in generated:
            result.dropped[key] = GENERATED_BACK[generated[key]]
        else:
            result.unknown.append(key)
    result.targets = [source for name, source in table.items() if name in present]
    result.missing = [k for k in expected_sd_keys(component, config, sd_prefix) if k not in present]
    return result
