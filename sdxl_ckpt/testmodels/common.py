"""What the tiny and the full-size synthetic models share: pipeline files, per-component seeds, CLIP configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdxl_ckpt.sdxl.configs import SCHEDULER_CONFIG, model_index

_COMPONENT_INDEX = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


def write_scheduler(out_dir: Path, config: dict[str, Any] | None = None) -> None:
    """SDXL's Euler scheduler, or the diffusers scheduler class ``config["_class_name"]`` names."""
    import diffusers

    config = config or SCHEDULER_CONFIG
    cls = getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler"))
    cls.from_config(config).save_pretrained(out_dir / "scheduler")


def write_model_index(out_dir: Path, variant: str) -> None:
    (out_dir / "model_index.json").write_text(json.dumps(model_index(variant), indent=2) + "\n", encoding="utf-8")


def component_seed(seed: int, component: str) -> int:
    """Each component gets its own seed so one component's weights don't depend on the others'."""
    return seed * 16 + _COMPONENT_INDEX[component]


def text_config(config: dict[str, Any]) -> Any:
    """A transformers CLIPTextConfig from our config dict (``model_type`` is a class attribute, not a kwarg)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in config.items() if k != "model_type"})
