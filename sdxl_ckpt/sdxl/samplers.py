"""The samplers the runtime has, and which diffusers scheduler is each one's independent reference: one table.

``reference`` runs the diffusers scheduler named here; ``verify`` accepts exactly the samplers that have one.
``latent_space`` is where that scheduler keeps its sample: ``ve`` holds our ``x``, ``vp`` holds
``x / sqrt(1 + sigma^2)`` (the DDPM space), which verify converts to before comparing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdxl_ckpt.errors import InputError


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    diffusers_scheduler: str | None  # None: no diffusers reference, so verify cannot check it
    latent_space: str | None


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("euler", "EulerDiscreteScheduler", "ve"),
        SamplerSpec("euler_a", None, None),
        SamplerSpec("heun", None, None),
        SamplerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", "vp"),
        SamplerSpec("lcm", "LCMScheduler", "vp"),
    )
}
REFERENCE_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if spec.diffusers_scheduler)


def reference_sampler(name: str) -> str:
    """``name`` as a sampler with a diffusers reference (case-insensitive); anything else is one clear error."""
    key = name.strip().lower().replace("-", "_")
    if key in REFERENCE_SAMPLERS:
        return key
    if key in SAMPLERS:
        raise InputError(
            f"sampler {name!r} has no diffusers reference, so it cannot be checked: choose "
            f"{', '.join(REFERENCE_SAMPLERS)} (ancestral samplers such as euler_a are not reproducible against one)"
        )
    raise InputError(f"unknown sampler {name!r} (choose {', '.join(REFERENCE_SAMPLERS)})")
