"""The architecture is read from names and shapes alone, and the expected key set is computed from it exactly.

Full size: the keymap YAMLs' shapes give back the official configs. Tiny and odd-proportion models: the
meta-device diffusers/transformers classes give the key set ``expected_keys`` must equal, and the config inferred
from that key set gives the same key set again.
"""

from __future__ import annotations

import pytest

from sdxl_ckpt.errors import InputError
from sdxl_ckpt.keymaps import load_keymap
from sdxl_ckpt.keymaps.expected import expected_keys
from sdxl_ckpt.sdxl.architecture import Architecture, infer_architecture
from sdxl_ckpt.sdxl.configs import full_configs

pytest.importorskip("diffusers")

from sdxl_ckpt.testmodels.tiny import SHAPES, shape_configs, tiny_configs  # noqa: E402


def _yaml_shapes(variant: str, ms: bool = False) -> dict[str, tuple[int, ...]]:
    return {(s.ms or s.sd) if ms else s.sd: s.shape for s in load_keymap(variant).specs}


def _meta_sd_shapes(structure: str, configs: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    from sdxl_ckpt.testmodels.full import meta_sd_shapes

    return meta_sd_shapes(structure, configs)


def _metadata(configs: dict) -> dict[str, str]:
    import json

    return {f"sdxl_ckpt.config.{c}": json.dumps(cfg) for c, cfg in configs.items()}


@pytest.mark.parametrize("variant", ["base", "refiner", "lcm"])
@pytest.mark.parametrize("ms", [False, True])
def test_full_size_key_set_gives_the_official_configs(variant, ms):
    arch = infer_architecture(_yaml_shapes(variant, ms))
    expected = full_configs(variant)
    if variant == "lcm":
        expected["unet"]["time_cond_proj_dim"] = 256  # the keymap's optional guidance embedding is in this key set
    assert arch.configs == expected
    assert arch.variant == variant and arch.structure == ("refiner" if variant == "refiner" else "base")
    assert arch.provenance["unet.attention_head_dim"] == "SDXL convention (64-channel heads)"
    assert arch.provenance["unet.block_out_channels"] == "weights"
    assert arch.provenance["unet.addition_time_embed_dim"].startswith("weights")


@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_tiny_key_set_gives_the_tiny_configs(variant):
    configs = tiny_configs(variant)
    shapes = {k: v[0] for k, v in _meta_sd_shapes(variant, configs).items()}
    with_metadata = infer_architecture(shapes, _metadata(configs))
    assert with_metadata.configs == configs
    assert with_metadata.provenance["unet.attention_head_dim"] == "metadata"
    bare = infer_architecture(shapes)  # no metadata: heads by convention (16-channel tiny heads are not 64)
    assert bare.configs["unet"]["block_out_channels"] == configs["unet"]["block_out_channels"]
    assert bare.configs["unet"]["attention_head_dim"] != configs["unet"]["attention_head_dim"]
    assert {k: v for k, v in bare.configs["unet"].items() if k not in ("attention_head_dim", "sample_size")} == {
        k: v for k, v in configs["unet"].items() if k not in ("attention_head_dim", "sample_size")
    }


def _cases() -> list[tuple[str, str, dict]]:
    cases = [(v, v, full_configs(v)) for v in ("base", "refiner")]
    cases += [(f"tiny-{v}", v, tiny_configs(v)) for v in ("base", "refiner")]
    cases += [(name, *shape_configs(name)) for name in SHAPES]
    structure, odd = shape_configs("odd")
    odd["unet"]["time_cond_proj_dim"] = 24
    odd["unet"]["layers_per_block"] = [1, 2, 3]
    odd["unet"]["reverse_transformer_layers_per_block"] = [[3, 1, 2, 3], [2, 2, 2], [1, 1]]
    cases.append(("odd-lcm-layers", structure, odd))
    return cases


@pytest.mark.parametrize("label,structure,configs", _cases(), ids=[c[0] for c in _cases()])
def test_expected_keys_equal_the_real_classes(label, structure, configs):
    """Names, order, shapes and dtype classes equal the meta-device models' keys mapped by the rule tables."""
    meta = _meta_sd_shapes(structure, configs)
    ours = expected_keys(Architecture("x", structure, configs, {}, {}))
    assert list(ours) == list(meta)
    assert {k: (e.shape, e.dtype) for k, e in ours.items()} == meta
    # the architecture read back from that key set gives the same key set (widths and depths all recovered)
    shapes = {k: e.shape for k, e in ours.items()}
    inferred = infer_architecture(shapes)
    assert {k: e.shape for k, e in expected_keys(inferred).items()} == shapes
    with_metadata = infer_architecture(shapes, _metadata(configs))
    for component, config in configs.items():
        for field in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "hidden_size"):
            if field in config:
                assert with_metadata.configs[component][field] == config[field], (component, field)


def test_refused_with_one_line():
    with pytest.raises(InputError, match="neither"):
        infer_architecture({"a.weight": (1,)})
    shapes = _yaml_shapes("base")
    del shapes["model.diffusion_model.out.2.weight"]
    with pytest.raises(InputError, match="out.2.weight"):
        infer_architecture(shapes)


@pytest.mark.parametrize("variant", ["base", "refiner", "lcm"])
def test_full_size_keymaps_equal_the_inferred_architecture(variant):
    """The checked-in keymap of a full-size key set is exactly what its inferred architecture and the rules give:
    every SD name, shape, dtype class and MindSpore name."""
    from sdxl_ckpt.keymaps.sd_ms import sd_to_ms_name

    keymap = load_keymap(variant)
    expected = expected_keys(infer_architecture(_yaml_shapes(variant)))
    assert set(expected) == {s.sd for s in keymap.specs}  # the YAML lists the optional keys after the required
    for spec in keymap.specs:
        assert (expected[spec.sd].shape, expected[spec.sd].dtype) == (spec.shape, spec.dtype), spec.sd
        assert sd_to_ms_name(spec.sd)[0] == spec.ms, spec.sd
