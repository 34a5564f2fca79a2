"""One comparison routine and one tolerance table for every verify stage.

Metrics (ours ``a`` against the reference ``b``): relative L2 ``|a - b| / |b|``, max abs ``max|a - b|``, cosine
``<a, b> / (|a| |b|)``; for images also the max and mean absolute difference in 0-255 levels (of the uint8 images
each side would save) and PSNR of the float images in [0, 1]. Computed in float64.

A stage passes when its relative L2 is within its tolerance; an image stage when, in addition, no pixel differs by
more than its level tolerance. Tolerances are looked up by stage name, then by group (the name before the first
space or dot: ``step 3/4`` -> ``step``), then the dtype default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdxl_ckpt.errors import InputError

# fp32 is measured (tests/test_verify_*.py); fp16 values are the published mindone fp16 parity level, untested here
DEFAULT_RTOL = {"fp32": 1e-4, "fp16": 5e-2}
DEFAULT_IMAGE_LEVELS = {"fp32": 1.0, "fp16": 8.0}
IMAGE_LEVELS_KEY = "image_levels"  # --rtol-override image_levels=N sets the per-pixel level bound


@dataclass
class StageResult:
    name: str
    reference: str  # the reference array(s) judged against
    rel_l2: float
    max_abs: float
    cosine: float
    tolerance: float
    passed: bool
    shape: tuple[int, ...] = ()
    levels_max: float | None = None
    levels_mean: float | None = None
    psnr: float | None = None
    note: str = ""
    seconds: float | None = None  # computing our side, the loading phase it entered included

    def row(self) -> dict[str, Any]:
        """The report row; infinities (a stage not computed, identical images' PSNR) become None for strict JSON."""

        def finite(v: float | None) -> float | None:
            return v if v is None or math.isfinite(v) else None

        return {
            "stage": self.name,
            "reference": self.reference,
            "rel_l2": finite(self.rel_l2),
            "max_abs": finite(self.max_abs),
            "cosine": self.cosine,
            "tol": self.tolerance,
            "levels_max": self.levels_max,
            "levels_mean": self.levels_mean,
            "psnr": finite(self.psnr),
            "ok": "ok" if self.passed else "FAIL",
            "note": self.note,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
        }


def group_of(name: str) -> str:
    return name.split(" ")[0].split(".")[0]


@dataclass
class Tolerances:
    dtype: str = "fp32"
    overrides: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DEFAULT_RTOL:
            raise InputError(f"no default tolerances for dtype {self.dtype!r} (expected one of {list(DEFAULT_RTOL)})")

    def rtol(self, name: str) -> float:
        for key in (name, name.split(" ")[0], group_of(name)):
            if key in self.overrides:
                return self.overrides[key]
        return DEFAULT_RTOL[self.dtype]

    def image_levels(self) -> float:
        return self.overrides.get(IMAGE_LEVELS_KEY, DEFAULT_IMAGE_LEVELS[self.dtype])


def parse_overrides(items: list[str] | None) -> dict[str, float]:
    """``stage=value`` strings (``--rtol-override``) -> dict; a malformed one is an InputError."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--rtol-override expects STAGE=VALUE, got {item!r}") from None
    return out


def metrics(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(relative L2, max abs, cosine) in float64; identical zeros give (0, 0, 1)."""
    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    diff = a - b
    norm_b, norm_a = float(np.linalg.norm(b)), float(np.linalg.norm(a))
    err = float(np.linalg.norm(diff))
    rel = err / norm_b if norm_b > 0 else err
    cos = float(a @ b) / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else (1.0 if err == 0 else 0.0)
    return rel, float(np.abs(diff).max()) if diff.size else 0.0, cos


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """diffusers' numpy_to_pil rule: round(x * 255)."""
    return (np.asarray(image01, np.float32) * 255).round().astype(np.uint8)


def compare(
    name: str,
    reference: str,
    ours: np.ndarray | None,
    ref: np.ndarray,
    tol: Tolerances,
    image: bool = False,
    ref_u8: np.ndarray | None = None,
    note: str = "",
) -> StageResult:
    """Judge one stage; a missing or wrongly shaped result fails with a note instead of raising."""
    rtol = tol.rtol(name)
    if ours is None or np.shape(ours) != np.shape(ref):
        why = "not computed" if ours is None else f"shape {list(np.shape(ours))} vs reference {list(np.shape(ref))}"
        return StageResult(
            name,
            reference,
            math.inf,
            math.inf,
            0.0,
            rtol,
            False,
            tuple(np.shape(ref)),
            note="; ".join(x for x in (note, why) if x),
        )
    rel, max_abs, cos = metrics(ours, ref)
    passed = bool(np.isfinite(rel)) and rel <= rtol
    result = StageResult(name, reference, rel, max_abs, cos, rtol, passed, tuple(np.shape(ref)), note=note)
    if image:
        ours_u8 = to_uint8(ours)
        ref_u8 = to_uint8(ref) if ref_u8 is None else ref_u8
        levels = np.abs(ours_u8.astype(np.int16) - ref_u8.astype(np.int16))
        result.levels_max, result.levels_mean = float(levels.max()), float(levels.mean())
        mse = float(np.mean((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)) ** 2))
        result.psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        limit = tol.image_levels()
        result.passed = result.passed and result.levels_max <= limit
        if result.levels_max > limit:
            result.note = "; ".join(x for x in (note, f"{result.levels_max:.0f} levels > {limit:g}") if x)
    return result


def first_failure(results: list[StageResult]) -> StageResult | None:
    return next((r for r in results if not r.passed), None)


def report_dict(results: list[StageResult], context: Mapping[str, Any]) -> dict[str, Any]:
    failed = first_failure(results)
    return {
        **context,
        "passed": failed is None,
        "first_failure": failed.name if failed else None,
        "stages": [r.row() for r in results],
    }
