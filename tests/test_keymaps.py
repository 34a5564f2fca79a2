"""Keymaps: the checked-in YAMLs are a fresh generation, the MindSpore names are mindone's published lists (with
the one documented correction), the rename rules do what keymaps/sd_ms.py says, variants are detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_ckpt.keymaps import KEYMAP_DIR, VARIANTS, load_keymap
from sdxl_ckpt.keymaps.mindone import check_lists, export_lists, read_list
from sdxl_ckpt.keymaps.sd_ms import RULES, sd_to_ms_name
from sdxl_ckpt.sdxl.variants import COND_PROJ_KEY

MINDONE = Path(__file__).parent / "data" / "mindone"
# mindone's stored base list spells the CLIP-L token embedding wrong; ours is corrected
MINDONE_MALFORMED = "conditioner.embedders.1.model.token_embedding..embedding_table"
CORRECTED = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table"


def _mindone(name: str) -> dict[str, tuple[int, ...]]:
    listed = read_list(MINDONE / name)
    assert len({k.name for k in listed}) == len(listed), f"{name} has duplicate names"
    return {k.name: k.shape for k in listed}


def _ours(variant: str, required_only: bool = True) -> dict[str, tuple[int, ...]]:
    keymap = load_keymap(variant)
    return {s.ms: s.shape for s in keymap.specs if s.ms is not None and (s.required or not required_only)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_checked_in_yaml_equals_fresh_generation(variant):
    from sdxl_ckpt.keymaps.generate import render

    assert (KEYMAP_DIR / f"{variant}.yaml").read_text() == render(variant)


L_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"


def test_counts():
    assert len(_ours("base")) == 2514 and len(load_keymap("base").specs) == 2515
    assert len(_ours("refiner")) == 1858 and load_keymap("refiner").dropped == {}
    assert len(_ours("lcm")) == 2513
    assert set(load_keymap("lcm").optional_sd) == {COND_PROJ_KEY, "conditioner.embedders.1.model.logit_scale", L_IDS}
    assert load_keymap("base").optional_sd == [L_IDS] and load_keymap("base").by_sd[L_IDS].dtype == "int"


def test_base_equals_mindone_except_the_corrected_key():
    theirs, ours = _mindone("mindspore_key_base.yaml"), _ours("base")
    assert len(theirs) == 2514
    assert set(theirs) - set(ours) == {MINDONE_MALFORMED}
    assert set(ours) - set(theirs) == {CORRECTED}
    assert theirs[MINDONE_MALFORMED] == ours[CORRECTED] == (49408, 768)
    assert {k: v for k, v in theirs.items() if k != MINDONE_MALFORMED} == {
        k: v for k, v in ours.items() if k != CORRECTED
    }


def test_lcm_equals_mindone_lcm_list():
    theirs, ours = _mindone("mindspore_key_base_lcm.yaml"), _ours("lcm")
    assert len(theirs) == 2513
    assert theirs == ours
    # with the optional keys: base's names plus the guidance embedding, under the name the runtime loads
    assert set(_ours("lcm", required_only=False)) == set(_ours("base", required_only=False)) | {COND_PROJ_KEY}


def test_refiner_equals_mindone_refiner_list():
    theirs = _mindone("mindspore_key_refiner.yaml")
    assert len(theirs) == 1858
    assert theirs == _ours("refiner")


def test_export_reads_back_and_passes_our_own_check(tmp_path):
    keymap = load_keymap("base")
    torch_text, ms_text = export_lists(keymap)
    t, m = tmp_path / "torch_key_base.yaml", tmp_path / "mindspore_key_base.yaml"
    t.write_text(torch_text)
    m.write_text(ms_text)
    shapes = {s.sd: s.shape for s in keymap.specs}
    skippable = {**keymap.dropped, **{k: "optional" for k in keymap.optional_sd}}
    assert check_lists(read_list(t), read_list(m), shapes, skippable, t, m) == []
    assert {k.name: k.shape for k in read_list(m)} == _ours("base")
    # mindone's stored base list (their order) paired with ours fails our check; its malformed key is named
    theirs = MINDONE / "mindspore_key_base.yaml"
    problems = check_lists(read_list(t), read_list(theirs), shapes, skippable, t, theirs)
    assert any(key == MINDONE_MALFORMED and "malformed" in msg for key, msg in problems)


def test_cli_export(tmp_path, capsys):
    from sdxl_ckpt.cli import main

    assert main(["keymaps", "export", "--model", "refiner", "--format", "mindone", "-o", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"torch_key_refiner.yaml", "mindspore_key_refiner.yaml"}
    assert {k.name: k.shape for k in read_list(tmp_path / "mindspore_key_refiner.yaml")} == _ours("refiner")
    assert main(["keymaps", "export", "--model", "refiner", "-o", str(tmp_path)]) == 2  # exists: refused
    capsys.readouterr()


U, V, L, G = (
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
)


@pytest.mark.parametrize(
    "sd,ms",
    [
        (U + "input_blocks.1.0.in_layers.0.weight", U + "input_blocks.1.0.in_layers.0.gamma"),
        (U + "input_blocks.1.0.in_layers.2.weight", U + "input_blocks.1.0.in_layers.2.weight"),
        (U + "out.0.bias", U + "out.0.beta"),
        (U + "out.2.bias", U + "out.2.bias"),
        (U + "input_blocks.4.1.norm.weight", U + "input_blocks.4.1.norm.gamma"),
        (
            U + "input_blocks.4.1.transformer_blocks.0.norm3.bias",
            U + "input_blocks.4.1.transformer_blocks.0.norm3.beta",
        ),
        (U + "input_blocks.4.1.proj_out.weight", U + "input_blocks.4.1.proj_out.weight"),
        (V + "encoder.norm_out.bias", V + "encoder.norm_out.beta"),
        (V + "decoder.mid.attn_1.norm.weight", V + "decoder.mid.attn_1.norm.gamma"),
        (V + "decoder.mid.attn_1.proj_out.weight", V + "decoder.mid.attn_1.proj_out.weight"),
        (G + "ln_final.weight", G + "ln_final.gamma"),
        (G + "transformer.resblocks.3.ln_2.bias", G + "transformer.resblocks.3.ln_2.beta"),
        (G + "token_embedding.weight", G + "token_embedding.embedding_table"),
        (G + "positional_embedding", G + "positional_embedding"),
        (G + "text_projection", G + "text_projection"),
        (G + "logit_scale", G + "logit_scale"),
        (L + "embeddings.position_embedding.weight", L + "embeddings.position_embedding.embedding_table"),
        (L + "embeddings.token_embedding.weight", CORRECTED),
        (L + "encoder.layers.0.layer_norm1.weight", L + "encoder.layers.0.layer_norm1.gamma"),
        (L + "final_layer_norm.bias", L + "final_layer_norm.beta"),
        (COND_PROJ_KEY, COND_PROJ_KEY),
        (L + "embeddings.position_ids", L + "embeddings.position_ids"),
    ],
)
def test_rules(sd, ms):
    assert sd_to_ms_name(sd)[0] == ms


def test_every_rule_is_used_and_the_map_is_one_to_one():
    used = set()
    for variant in VARIANTS:
        keymap = load_keymap(variant)
        assert len(keymap.ms_to_sd) == len(keymap.sd_to_ms)
        for spec in keymap.specs:
            ms, rule = sd_to_ms_name(spec.sd)
            assert ms == spec.ms
            used.add(rule)
    assert used == set(RULES)
