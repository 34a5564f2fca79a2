"""The LoRA module index of an SDXL structure: every targetable module under each format's spelling of its name.

LoRA formats name the module a LoRA patches in four ways (diffusers path, sgm path, either with ``.`` turned into
``_`` after a ``lora_unet_`` / ``lora_te1_`` prefix, mindone's parameter path). Turning ``_`` back into ``.``
cannot work (``to_q``, ``proj_in``, ``transformer_blocks`` contain ``_``), so the index goes the other way: it
lists every module of the structure from the rule tables of ``keymaps.diffusers_sd`` (the same tables the model
converters use; each rule's pattern is a finite regular language, enumerated by ``rule_language``) and spells each
module in every format. A LoRA key is then looked up exactly; a name the index lacks is an unknown key, never a guess.

A module's weight lands in one SD tensor (``sd_key``) through the rule's transform: ``none``; ``transpose`` (the
OpenCLIP ``text_projection``, stored x @ P in SD); ``concat_qkv`` (OpenCLIP q/k/v are the three row blocks of one
``attn.in_proj_weight``; ``part`` says which).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.keymaps.diffusers_sd import QKV_ORDER, SD_PREFIXES, component_rules
from sdxl_ckpt.keymaps.sd_diffusers import rule_language
from sdxl_ckpt.keymaps.templates import expand_template
from sdxl_ckpt.sdxl.configs import full_configs

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MODULE_LIST_FIELDS = ("component", "module", "sd_key", "transform", "part")
STRUCTURES = ("base", "refiner")
# kohya (sd-scripts) component prefixes; the refiner's only encoder is OpenCLIP, still named te2 here
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# PEFT / diffusers: the pipeline attribute of each component
PEFT_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."}
# the HF CLIP level transformers < 5.6 saves and SD keeps; newer CLIPTextModel files lack it
CLIP_LEVEL = "text_model."
# old diffusers attention processors (LoRAAttnProcessor): the LoRA lives beside the attention module
OLD_PROCESSOR = {"to_q": "processor.to_q_lora", "to_k": "processor.to_k_lora", "to_v": "processor.to_v_lora"}
OLD_PROCESSOR_OUT = ("to_out.0", "processor.to_out_lora")
OLD_TEXT_SUFFIX = ".lora_linear_layer"
OLD_TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
# The modules mindone's SDXL gm LoRA networks replace with its LoRA Dense (in diffusers / HF module names):
#   UNetModel_lora (gm/modules/diffusionmodules/openaimodel.py): to_q, to_k, to_v, to_out[0] of every CrossAttention;
#   FrozenCLIPEmbedder_lora (gm/modules/embedders/modules.py): k_proj, v_proj, q_proj, out_proj of every CLIPAttention;
#   FrozenOpenCLIPEmbedder2_lora (same file): out_proj of every MultiheadAttention (q/k/v are one in_proj_weight).
MINDONE_DECLARED = {
    "unet": r".*\.attn[12]\.to_(?:q|k|v|out\.0)",
    "text_encoder": r".*\.self_attn\.(?:q|k|v|out)_proj",
    "text_encoder_2": r".*\.self_attn\.out_proj",
}


@dataclass(frozen=True)
class Module:
    """One LoRA-targetable module: component, diffusers / HF path (CLIP with ``text_model.``), where its weight is."""

    component: str
    module: str
    sd_key: str
    transform: str  # "none" | "transpose" | "concat_qkv"
    part: int | None = None  # concat_qkv: 0, 1, 2 = the q, k, v row block of sd_key

    @property
    def sd_module(self) -> str | None:
        """The SD (sgm) module path when the weight is a whole SD tensor named ``<module>.weight``; else None."""
        if self.transform != "none" or not self.sd_key.endswith(".weight"):
            return None
        return self.sd_key.removesuffix(".weight")

    @property
    def label(self) -> str:
        return f"{self.component}:{self.module}"


@dataclass
class ModuleIndex:
    """All modules of one structure, and every spelling that names each."""

    structure: str
    modules: dict[tuple[str, str], Module] = field(default_factory=dict)
    kohya: dict[str, Module] = field(default_factory=dict)  # "lora_unet_..." / "lora_te1_..." (without suffix)
    peft: dict[str, Module] = field(default_factory=dict)  # "unet.<path>" / "text_encoder.<path>"
    old: dict[str, Module] = field(default_factory=dict)  # old attention-processor module names
    mindone: dict[str, Module] = field(default_factory=dict)  # mindone parameter path (= SD module path)

    def _add(self, table: dict[str, Module], name: str, module: Module) -> None:
        other = table.get(name)
        if other is not None and other != module:
            raise AssertionError(f"{name!r} names both {other.label} and {module.label}")
        table[name] = module


def _flat_clip(module: str) -> str | None:
    """The same CLIP module without the ``text_model.`` level (transformers >= 5.6 CLIPTextModel names)."""
    return module[len(CLIP_LEVEL) :] if module.startswith(CLIP_LEVEL) else None


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _require_structure(structure: str) -> None:
    if structure not in STRUCTURES:
        raise InputError(f"unknown structure {structure!r} (expected base or refiner)")


def rule_modules(structure: str) -> list[Module]:
    """Every LoRA-targetable module of ``structure`` (base or refiner; LCM is base), from the rule tables: their
    keys for the full-size configs that the structure's keymap holds (so a rule's optional tensor, e.g. a shortcut
    conv, only where it exists). The tiny test models keep every block, depth and layer count of the real ones, so
    their names are the same.

    Enumerating the rules' languages and reading the keymap take ~0.2 s, most of a small LoRA command: the result
    is shipped as ``lora/modules_<structure>.tsv`` (written by ``python -m sdxl_ckpt.lora.index_file``; a test
    keeps the files equal to this function's output), and ``module_index`` reads that.
    """
    _require_structure(structure)
    configs = full_configs(structure)
    present = set(load_keymap(structure).by_sd)  # the rules accept optional tensors the architecture may lack
    modules = []
    for component in LORA_COMPONENTS:
        prefix = SD_PREFIXES[structure].get(component)
        if prefix is None:
            continue
        for rule in component_rules(component, configs[component], prefix):
            if rule.replacement is None:
                continue
            for key in rule_language(rule.pattern):
                if not key.endswith(".weight") or key.endswith("embedding.weight"):
                    continue  # biases and embedding tables are no LoRA targets
                match = rule.regex.fullmatch(key)
                part = QKV_ORDER.index(match.group("qkv")) if rule.transform == "concat_qkv" else None
                sd_key = expand_template(match, rule.replacement)
                if sd_key in present:
                    modules.append(Module(component, key.removesuffix(".weight"), sd_key, rule.transform, part))
    return modules


def module_list_path(structure: str) -> Path:
    """The shipped ``rule_modules`` of ``structure``: a header line (``MODULE_LIST_FIELDS``), then one line per
    module, tab-separated, an empty ``part`` for None."""
    return Path(__file__).resolve().parent / f"modules_{structure}.tsv"


def read_modules(structure: str) -> list[Module]:
    """The modules of ``structure`` from its shipped list (~100x faster than ``rule_modules``)."""
    path = module_list_path(structure)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"the LoRA module list is missing from the installation: {exc.strerror}", path=path) from None
    header, *rows = text.splitlines()
    if header.split("\t") != list(MODULE_LIST_FIELDS):
        raise InputError(f"not a LoRA module list (header {header!r})", path=path)
    modules = []
    for row in rows:
        component, module, sd_key, transform, part = row.split("\t")
        modules.append(Module(component, module, sd_key, transform, int(part) if part else None))
    return modules


@cache
def module_index(structure: str) -> ModuleIndex:
    """The index of ``structure`` (base or refiner): every module of its shipped list under each spelling."""
    _require_structure(structure)
    index = ModuleIndex(structure)
    for module in read_modules(structure):
        _register(index, module)
    return index


def _register(index: ModuleIndex, module: Module) -> None:
    index.modules[(module.component, module.module)] = module
    spellings = [module.module]
    flat = _flat_clip(module.module) if module.component != "unet" else None
    if flat is not None:
        spellings.append(flat)
    for name in spellings:
        index._add(index.kohya, KOHYA_PREFIX[module.component] + _underscored(name), module)
        index._add(index.peft, PEFT_PREFIX[module.component] + name, module)
    if module.component == "unet":
        index._add(index.peft, module.module, module)  # a bare UNet state dict (peft's own, no "unet." prefix)
        # kohya's sgm spelling (sd-scripts SDXL): the SD module path inside the UNet
        sgm = module.sd_module.removeprefix(SD_PREFIXES[index.structure]["unet"])
        index._add(index.kohya, KOHYA_PREFIX["unet"] + _underscored(sgm), module)
        attention, _, last = module.module.rpartition(".")
        if last in OLD_PROCESSOR:
            old = f"{attention}.{OLD_PROCESSOR[last]}"
        elif module.module.endswith("." + OLD_PROCESSOR_OUT[0]):
            old = f"{module.module.removesuffix(OLD_PROCESSOR_OUT[0])}{OLD_PROCESSOR_OUT[1]}"
        else:
            old = None
        if old is not None:
            index._add(index.old, "unet." + old, module)
            index._add(index.old, old, module)  # the oldest files have no "unet." prefix
    elif module.module.rpartition(".")[2] in OLD_TEXT_MODULES:
        for name in spellings:
            index._add(index.old, PEFT_PREFIX[module.component] + name + OLD_TEXT_SUFFIX, module)
    if module.sd_module is not None:
        index._add(index.mindone, module.sd_module, module)


def mindone_declares(module: Module) -> bool:
    """Whether mindone's gm LoRA networks have a LoRA layer on ``module`` (see ``MINDONE_DECLARED``)."""
    return module.sd_module is not None and re.fullmatch(MINDONE_DECLARED[module.component], module.module) is not None


def kohya_name(module: Module, structure: str, spelling: str) -> str:
    """The kohya name of ``module``: UNet in ``sgm`` (sd-scripts SDXL) or ``diffusers`` spelling; CLIP: text_model."""
    if module.component == "unet" and spelling == "sgm":
        return KOHYA_PREFIX["unet"] + _underscored(module.sd_module.removeprefix(SD_PREFIXES[structure]["unet"]))
    return KOHYA_PREFIX[module.component] + _underscored(module.module)


def peft_target(module: Module) -> str:
    """The module's name for PEFT ``target_modules`` / ``rank_pattern`` / ``alpha_pattern``: PEFT matches these at a
    dot boundary at the end of a module path, so a CLIP path without ``text_model.`` matches both CLIP spellings."""
    flat = _flat_clip(module.module) if module.component != "unet" else None
    return flat or module.module


def peft_name(module: Module) -> str:
    return PEFT_PREFIX[module.component] + module.module
