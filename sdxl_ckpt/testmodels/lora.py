"""LoRA files for tests and the bench, made by the real tools: peft adapters on a tiny pipeline, saved by diffusers.

``build_peft_lora`` injects peft LoRA layers into a tiny pipeline's UNet and text encoders (each its own rank and
alpha; ``rank_pattern`` / ``alpha_pattern`` give some modules others), fills every factor with seeded noise
(peft initialises lora_B to zero: a zero delta would prove nothing), and writes

  peft.safetensors   ``save_lora_weights`` with the adapter configs as metadata (the true alphas)
  kohya.safetensors  diffusers' ``convert_state_dict_to_kohya`` of the same tensors, each ``.alpha`` set to the
                     module's true alpha (diffusers writes alpha = rank whatever the training used)

and returns the true delta of every module, read from peft's own layers: ``scaling * B @ A`` (conv: over the rank).
``synthetic_lora`` writes a full-size PEFT file with numpy only (random factors; shapes from the keymap), for the
bench, where building a full-size pipeline is not an option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AdapterSpec:
    """One component's peft LoraConfig: targets, rank, alpha, and per-module exceptions (PEFT pattern keys)."""

    targets: tuple[str, ...]
    rank: int
    alpha: float
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            init_lora_weights=True,
        )


# UNet attention, FF and resnet convs (3x3: conv LoRA) at rank 4 / alpha 8, FF at rank 1 / alpha 3;
# CLIP-L rank 8 / alpha 3 with fc1 at alpha 5; OpenCLIP rank 1 / alpha 2, with text_projection.
FULL_COVERAGE: dict[str, AdapterSpec] = {
    "unet": AdapterSpec(
        ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "proj_in"),
        4,
        8.0,
        rank_pattern={"ff.net.0.proj": 1},
        alpha_pattern={"ff.net.0.proj": 3.0},
    ),
    "text_encoder": AdapterSpec(("q_proj", "k_proj", "v_proj", "out_proj", "fc1"), 8, 3.0, alpha_pattern={"fc1": 5.0}),
    "text_encoder_2": AdapterSpec(("q_proj", "k_proj", "v_proj", "out_proj", "fc2", "text_projection"), 1, 2.0),
}
# what mindone's gm LoRA networks declare: UNet attention, CLIP-L attention, OpenCLIP out_proj
MINDONE_COVERAGE: dict[str, AdapterSpec] = {
    "unet": AdapterSpec(("to_q", "to_k", "to_v", "to_out.0"), 4, 6.0),
    "text_encoder": AdapterSpec(("q_proj", "k_proj", "v_proj", "out_proj"), 8, 2.0),
    "text_encoder_2": AdapterSpec(("out_proj",), 4, 1.0),
}


def _fill(model: Any, seed: int, std: float) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _true_deltas(model: Any, component: str) -> dict[str, np.ndarray]:
    """PEFT name (``<component>.<module path>``) -> peft's own scaling * B @ A (fp32), from the injected layers."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            a = layer.lora_A["default"].weight.detach().double().numpy()
            b = layer.lora_B["default"].weight.detach().double().numpy()
            if a.ndim == 4:
                delta = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
            else:
                delta = b @ a
            out[f"{component}.{name}"] = (delta * layer.scaling["default"]).astype(np.float32)
    return out


def build_peft_lora(
    pipe_dir: Path, out_dir: Path, specs: Mapping[str, AdapterSpec], *, seed: int = 0, std: float = 0.05
) -> dict[str, Any]:
    """Make the LoRA on the pipeline at ``pipe_dir``; write peft / kohya files into ``out_dir``; paths + deltas."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((pipe_dir / "model_index.json").read_text())
    cls = (
        StableDiffusionXLImg2ImgPipeline
        if index["_class_name"].endswith("Img2ImgPipeline")
        else (StableDiffusionXLPipeline)
    )
    pipe = cls.from_pretrained(pipe_dir, torch_dtype=torch.float32, local_files_only=True)
    layers: dict[str, dict[str, Any]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    deltas: dict[str, np.ndarray] = {}
    for i, (component, spec) in enumerate(specs.items()):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        config = spec.config()
        if component == "unet":
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
        _fill(model, seed * 31 + i, std)
        layers[component] = get_peft_model_state_dict(model)
        metadata[component] = config.to_dict()
        deltas.update(_true_deltas(model, component))
    kwargs = {f"{c}_lora_layers": v for c, v in layers.items()}
    kwargs.update({f"{c}_lora_adapter_metadata": v for c, v in metadata.items()})
    cls.save_lora_weights(str(out_dir), weight_name="peft.safetensors", **kwargs)
    peft_path = out_dir / "peft.safetensors"

    from safetensors.torch import load_file

    state = load_file(str(peft_path))
    kohya: dict[str, Any] = {}
    modules = {c: dict(getattr(pipe, c).named_modules()) for c in layers}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        one = {key: state[key], f"{module}.lora_B.weight": state[f"{module}.lora_B.weight"]}
        converted = convert_state_dict_to_kohya(one)  # diffusers' own naming, one module at a time
        component, _, path = module.partition(".")
        mine = modules[component]
        layer = mine[path] if path in mine else mine[path.removeprefix("text_model.")]
        for name, value in converted.items():
            if name.endswith(".alpha"):
                value = torch.tensor(float(layer.lora_alpha["default"]), dtype=torch.float32)
            kohya[name] = value.contiguous()
    kohya_path = out_dir / "kohya.safetensors"
    save_file(kohya, str(kohya_path))
    return {"peft": peft_path, "kohya": kohya_path, "deltas": deltas, "pipe": pipe}


def synthetic_lora(out: Path, sd_file: Path, rank: int = 16, seed: int = 0) -> Path:
    """A PEFT LoRA on every UNet attention projection of the SD file ``sd_file`` (its shapes, any size), random
    factors (fp16), alpha = rank / 2: the bench's merge input, made with numpy only."""
    from sdxl_ckpt.formats.entries import entry_from_array
    from sdxl_ckpt.formats.safetensors_io import read_safetensors, write_safetensors
    from sdxl_ckpt.lora.names import mindone_declares, module_index
    from sdxl_ckpt.sdxl.architecture import infer_architecture
    from sdxl_ckpt.sdxl.variants import structure_of

    parsed = read_safetensors(sd_file)
    shapes = {e.name: e.shape for e in parsed.entries}
    structure = structure_of(infer_architecture(shapes, parsed.metadata).variant)
    rng = np.random.default_rng(seed)
    entries = []
    for module in module_index(structure).modules.values():
        if module.component != "unet" or not mindone_declares(module):
            continue
        out_dim, in_dim = shapes[module.sd_key][:2]
        name = f"unet.{module.module}"
        down = (rng.standard_normal((rank, in_dim)) * 0.01).astype(np.float16)
        up = (rng.standard_normal((out_dim, rank)) * 0.01).astype(np.float16)
        entries += [entry_from_array(f"{name}.lora_A.weight", down), entry_from_array(f"{name}.lora_B.weight", up)]
    meta = {"unet.r": rank, "unet.lora_alpha": rank / 2, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    write_safetensors(out, entries, {"lora_adapter_metadata": json.dumps(meta), "format": "pt"}, overwrite=True)
    return out
