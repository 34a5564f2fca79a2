"""SD (sgm) -> MindSpore (mindone "gm") key names: one small ordered rule table; no value ever changes.

MindSpore's ``nn.GroupNorm`` / ``nn.LayerNorm`` call their affine parameters ``gamma`` / ``beta`` and
``nn.Embedding`` calls its table ``embedding_table``; everything else (convs, linears, raw Parameters such as
``positional_embedding``, ``text_projection``, ``logit_scale``, ``attn.in_proj_*``) keeps its SD name.
CLIP-L's ``position_ids`` (an int64 buffer in SD files) is an int32 Parameter [1, 77] in mindone's
``CLIPTextEmbeddings``, so it is written under the same name as int32 (same values); ``ms-to-st`` gives back int64.
The first rule whose pattern fully matches the SD key decides. The generated keymaps (``base.yaml``...) spell
out every resulting pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.keymaps.templates import expand_template
from sdxl_ckpt.sdxl.architecture import sd_name

# modules whose .weight/.bias are a GroupNorm/LayerNorm affine: matched as the LAST path component(s) of the module
NORM_MODULES = (
    r"in_layers\.0",
    r"out_layers\.0",  # UNet ResBlock GroupNorms
    r"norm",
    r"norm[123]",
    r"norm_out",  # SpatialTransformer / BasicTransformerBlock, VAE resnets and attention
    r"layer_norm[12]",
    r"final_layer_norm",  # HF CLIP (CLIP-L)
    r"ln_[12]",
    r"ln_final",  # open_clip (bigG)
)
NORM_PATHS = (r"model\.diffusion_model\.out\.0",)  # the UNet's final GroupNorm (out.2 is a conv)
EMBEDDING_MODULES = (r"token_embedding", r"position_embedding")

_NORM = "|".join([rf"(?:.*\.)?(?:{'|'.join(NORM_MODULES)})", *NORM_PATHS])
_EMBEDDING = rf"(?:.*\.)?(?:{'|'.join(EMBEDDING_MODULES)})"


@dataclass(frozen=True)
class Rule:
    """``pattern`` (full match on an SD key) -> ``replacement`` (``re`` template), or None = drop; ``why``."""

    pattern: str
    replacement: str | None
    why: str
    dtype: str | None = None  # the MindSpore dtype when the value must change type (integers only, never floats)

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


RULES: tuple[Rule, ...] = (
    Rule(
        r".*\.position_ids",
        r"\g<0>",
        "int64 buffer in SD files; mindone's CLIPTextEmbeddings declares an int32 Parameter [1, n]: written as int32 "
        "(same values), back to int64 by ms-to-st",
        dtype="I32",
    ),
    Rule(rf"(?P<m>{_NORM})\.weight", r"\g<m>.gamma", "GroupNorm/LayerNorm weight is 'gamma' in MindSpore"),
    Rule(rf"(?P<m>{_NORM})\.bias", r"\g<m>.beta", "GroupNorm/LayerNorm bias is 'beta' in MindSpore"),
    Rule(rf"(?P<m>{_EMBEDDING})\.weight", r"\g<m>.embedding_table", "nn.Embedding weight is 'embedding_table'"),
    Rule(r".*", r"\g<0>", "same name"),
)


def sd_to_ms_name(sd_key: str, rules: tuple[Rule, ...] = RULES) -> tuple[str | None, Rule]:
    """The MindSpore name of an SD key (None = dropped) and the rule that decided it."""
    for rule in rules:
        match = rule.regex.fullmatch(sd_key)
        if match is not None:
            return (None if rule.replacement is None else expand_template(match, rule.replacement)), rule
    raise AssertionError("the last rule matches every key")  # pragma: no cover


def ms_entries_as_sd(entries: list[TensorEntry]) -> tuple[dict[str, TensorEntry], list[tuple[str | None, str]]]:
    """MindSpore entries under their SD names; a name the rename rules would not give is a problem."""
    out: dict[str, TensorEntry] = {}
    problems: list[tuple[str | None, str]] = []
    for entry in entries:
        sd = sd_name(entry.name)
        ms, _rule = sd_to_ms_name(sd)
        if ms != entry.name:
            hint = f"; the MindSpore name of {sd!r} is {ms!r}" if ms else ""
            problems.append((entry.name, f"not a MindSpore name the rename rules give{hint}"))
        else:
            out[sd] = entry
    return out, problems
