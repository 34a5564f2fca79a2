"""The whole SDXL as one MindSpore Cell, nested like sgm's DiffusionEngine so parameter names ARE checkpoint keys.

  conditioner.embedders.N.*     text encoders (+ parameterless size embedders)
  model.diffusion_model.*       UNet
  first_stage_model.*           VAE
A subset of components can be built (e.g. only the UNet for a benchmark, only the VAE to decode); the loader
then fills that subset and skips the other components' keys. A built component can also be released (its cell
and parameters dropped) and built again: phased loading keeps only the components of the current phase filled.
"""

from __future__ import annotations

from collections.abc import Iterable

from mindspore import Parameter, nn

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.sdxl_runtime.conditioner import GeneralConditioner
from sdxl_ckpt.sdxl_runtime.config import SDXLConfig
from sdxl_ckpt.sdxl_runtime.device import Runtime
from sdxl_ckpt.sdxl_runtime.unet import DiffusionWrapper
from sdxl_ckpt.sdxl_runtime.vae import AutoencoderKL

COMPONENT_PREFIXES = {"conditioner": "conditioner.", "unet": "model.diffusion_model.", "vae": "first_stage_model."}
ALL_COMPONENTS = tuple(COMPONENT_PREFIXES)
CELL_ATTRIBUTES = {"conditioner": "conditioner", "unet": "model", "vae": "first_stage_model"}


def component_of(key: str) -> str | None:
    """Which component a checkpoint key belongs to (None: none of SDXL's)."""
    for component, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return component
    return None


class SDXLNet(nn.Cell):
    """Top-level cell; ``components`` says which of conditioner / unet / vae exist."""

    def __init__(
        self, config: SDXLConfig, rt: Runtime | None = None, components: Iterable[str] = ALL_COMPONENTS
    ) -> None:
        super().__init__()
        rt = rt or Runtime()
        self.config, self.rt = config, rt
        self.components = tuple(c for c in ALL_COMPONENTS if c in set(components))
        unknown = set(components) - set(ALL_COMPONENTS)
        if unknown or not self.components:
            raise InputError(f"components must be some of {', '.join(ALL_COMPONENTS)}; got {sorted(components)}")
        for component in self.components:
            self.build(component)

    def build(self, component: str) -> nn.Cell:
        """(Re)create one component's cell with lazy parameters (nothing allocated until filled)."""
        config, rt = self.config, self.rt
        if component == "conditioner":
            cell: nn.Cell = GeneralConditioner(config, rt)
        elif component == "unet":
            cell = DiffusionWrapper(config.unet, rt)
        else:
            cell = AutoencoderKL(config.vae, rt.upcast() if config.vae.force_upcast else rt)
        setattr(self, CELL_ATTRIBUTES[component], cell)
        return cell

    def release(self, component: str) -> None:
        """Drop one component's cell, and with it its parameters' memory (``build`` makes it again)."""
        attribute = CELL_ATTRIBUTES[component]
        if attribute in self._cells:
            delattr(self, attribute)

    def is_built(self, component: str) -> bool:
        return CELL_ATTRIBUTES[component] in self._cells

    def named_params(self) -> dict[str, Parameter]:
        """Parameter name -> Parameter (the names a checkpoint must supply, no more, no less)."""
        return dict(self.parameters_and_names())
