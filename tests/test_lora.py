"""LoRA: names from the rule tables, conversions that keep every delta, merges that equal diffusers' own fuse.

LoRAs are made by the real tools (``sdxl_ckpt.testmodels.lora``): peft adapters on the tiny base and refiner
(ranks 1, 4 and 8, alphas != rank, UNet attention / FF / resnet convs / proj_in, both text encoders), saved by
diffusers' ``save_lora_weights`` and converted to kohya by diffusers' ``convert_state_dict_to_kohya`` (alpha set to
the true one). The truth every check uses is peft's own ``scaling * B @ A`` of each injected layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdxl_ckpt.cli import main
from sdxl_ckpt.errors import InputError
from sdxl_ckpt.formats.dtypes import to_float32
from sdxl_ckpt.lora import names
from sdxl_ckpt.lora.delta import lora_delta
from sdxl_ckpt.lora.index_file import main as index_file_main
from sdxl_ckpt.lora.index_file import render
from sdxl_ckpt.lora.names import module_index, module_list_path, read_modules, rule_modules
from sdxl_ckpt.lora.read import read_lora

pytestmark = [pytest.mark.torch, pytest.mark.slow]
_CACHE: dict[str, object] = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


@pytest.fixture(scope="session")
def base_lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sdxl_ckpt.testmodels.lora import FULL_COVERAGE, build_peft_lora

    return build_peft_lora(tiny_base, tmp_path_factory.mktemp("lora_base"), FULL_COVERAGE, seed=1)


@pytest.fixture(scope="session")
def refiner_lora(tiny_refiner: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sdxl_ckpt.testmodels.lora import FULL_COVERAGE, build_peft_lora

    return build_peft_lora(tiny_refiner, tmp_path_factory.mktemp("lora_refiner"), FULL_COVERAGE, seed=2)


@pytest.fixture(scope="session")
def mindone_lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from sdxl_ckpt.testmodels.lora import MINDONE_COVERAGE, build_peft_lora

    return build_peft_lora(tiny_base, tmp_path_factory.mktemp("lora_mindone"), MINDONE_COVERAGE, seed=3)


@pytest.fixture(scope="session")
def base_sd(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd

    out = tmp_path_factory.mktemp("lora_sd") / "base.safetensors"
    convert_diffusers_to_sd(tiny_base, out)
    return out


def _true(made: dict, structure: str) -> dict[str, np.ndarray]:
    """peft's deltas keyed by our module label (the PEFT name looked up in the index, flat CLIP names included)."""
    index = module_index(structure)
    return {index.peft[name].label: delta for name, delta in made["deltas"].items()}


def _deltas(path: Path, **kwargs) -> dict[str, np.ndarray]:
    lora = read_lora(path, **kwargs)
    return {g.module.label: lora_delta(g.down, g.up, g.mid, g.scale) for g in lora.groups}


def _assert_same_deltas(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), f"{what}: modules differ: {sorted(set(got) ^ set(want))[:5]}"
    for label, delta in want.items():
        err = float(np.abs(got[label].reshape(delta.shape) - delta).max())
        assert err <= 2e-6 * float(np.abs(delta).max()) + 1e-9, f"{what}: {label} off by {err}"


def _convert(src: Path, out: Path, to: str, *extra: str) -> dict:
    report = out.with_suffix(".json")
    rc = main(["lora", "convert", str(src), "-o", str(out), "--to", to, "--quiet", "--json", str(report), *extra])
    assert rc == 0
    return json.loads(report.read_text())


def _merge(base: Path, loras: list[Path], out: Path, *extra: str) -> dict:
    report = out.with_name(out.name + ".json")
    argv = ["lora", "merge", str(base), *map(str, loras), "-o", str(out), "--quiet", "--json", str(report), *extra]
    assert main(argv) == 0
    return json.loads(report.read_text())


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from sdxl_ckpt.formats.ckpt_io import scan_ckpt
    from sdxl_ckpt.formats.safetensors_io import read_safetensors

    entries = scan_ckpt(path).entries if path.suffix == ".ckpt" else read_safetensors(path).entries
    return {e.name: (e.dtype, e.load()) for e in entries}


# --- the name map ---------------------------------------------------------------------------------------------------


def test_module_index_is_built_from_the_architecture_keys():
    """Every module of the index names a real SD tensor of the keymap, and the spellings of the issue resolve."""
    from sdxl_ckpt.keymaps import load_keymap

    for structure in ("base", "refiner"):
        index = module_index(structure)
        sd_keys = set(load_keymap(structure).by_sd)
        assert all(m.sd_key in sd_keys for m in index.modules.values())
    index = module_index("base")
    sgm = index.kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert sgm is index.kohya["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert sgm.sd_key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert index.kohya["lora_unet_input_blocks_4_1_proj_in"].module == "down_blocks.1.attentions.0.proj_in"
    te2_k = index.kohya["lora_te2_text_model_encoder_layers_3_self_attn_k_proj"]
    assert (te2_k.sd_key, te2_k.transform, te2_k.part) == (
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
        "concat_qkv",
        1,
    )
    assert index.modules[("text_encoder_2", "text_projection")].transform == "transpose"
    # transformers >= 5.6 CLIPTextModel names (no text_model level) are the same modules
    assert (
        index.peft["text_encoder.encoder.layers.0.mlp.fc1"]
        is index.peft["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    )
    assert (
        index.kohya["lora_te1_encoder_layers_0_mlp_fc1"] is index.kohya["lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    )
    refiner = module_index("refiner")
    assert refiner.kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].sd_key.startswith(
        "conditioner.embedders.0.model."
    )


def test_shipped_module_lists_equal_the_rule_tables(tmp_path):
    """The lists ``module_index`` reads are exactly what the rule tables enumerate now (regenerate with
    ``python -m sdxl_ckpt.lora.index_file``), and a damaged list is refused with one line."""
    for structure in ("base", "refiner"):
        assert module_list_path(structure).read_text(encoding="utf-8") == render(structure)
        assert read_modules(structure) == rule_modules(structure)
    assert index_file_main(["--check"]) == 0


def test_a_damaged_module_list_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "modules_base.tsv"
    damaged.write_text("name\tsd\n", encoding="utf-8")
    monkeypatch.setattr(names, "module_list_path", lambda structure: damaged)
    with pytest.raises(InputError, match="not a LoRA module list"):
        names.read_modules("base")
    damaged.unlink()
    with pytest.raises(InputError, match="missing from the installation"):
        names.read_modules("base")


# --- conversions keep every delta -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_convert_round_trips_every_delta(which, base_lora, refiner_lora, tmp_path):
    made = base_lora if which == "base" else refiner_lora
    want = _true(made, which)
    peft = read_lora(made["peft"])
    assert peft.structure == which and peft.format == "peft"
    assert {g.rank for g in peft.groups} == {1, 4, 8} if which == "base" else {1, 4}
    assert any(g.alpha != g.rank for g in peft.groups) and {g.kind for g in peft.groups} >= {"linear", "conv"}
    assert {g.alpha_source for g in peft.groups} == {"metadata"}
    _assert_same_deltas(_deltas(made["peft"]), want, "diffusers' PEFT file")
    _assert_same_deltas(_deltas(made["kohya"]), want, "diffusers' kohya file")
    chain = [("kohya", ()), ("peft", ()), ("kohya", ("--kohya-names", "diffusers")), ("peft", ())]
    for start in ("peft", "kohya"):
        current = made[start]
        for step, (to, extra) in enumerate(chain):
            out = tmp_path / f"{start}_{step}_{to}.safetensors"
            report = _convert(current, out, to, *extra)
            assert report["modules"] == len(want)
            _assert_same_deltas(_deltas(out), want, f"{start} -> ... -> {to} ({step})")
            current = out
    sgm = read_lora(tmp_path / "peft_0_kohya.safetensors")
    unet_names = [k for g in sgm.groups if g.module.component == "unet" for k in g.keys]
    assert all(
        n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
        for n in unet_names
    )


def test_old_attention_processor_names(mindone_lora, tmp_path):
    """The old diffusers LoRAAttnProcessor / text lora_linear_layer names read as the same modules (alpha = rank)."""
    from safetensors.numpy import save_file

    old_names = {"to_q": "processor.to_q_lora", "to_k": "processor.to_k_lora", "to_v": "processor.to_v_lora"}
    tensors = {}
    for name, (_dtype, value) in _tensors(mindone_lora["peft"]).items():
        module, _, factor = name.rpartition(".lora_")
        factor = {"A.weight": "down.weight", "B.weight": "up.weight"}[factor]
        head, _, last = module.rpartition(".")
        if module.startswith("unet."):
            module = (
                f"{head}.{old_names[last]}"
                if last in old_names
                else module.replace(".to_out.0", ".processor.to_out_lora")
            )
        else:
            module = module + ".lora_linear_layer"
        tensors[f"{module}.{factor}"] = value
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    assert lora.format == "old-diffusers" and {g.alpha_source for g in lora.groups} == {"default (= rank)"}
    rank_over_alpha = {g.module.label: g.rank / g.alpha for g in read_lora(mindone_lora["peft"]).groups}
    want = {k: v * rank_over_alpha[k] for k, v in _true(mindone_lora, "base").items()}
    _assert_same_deltas(_deltas(path), want, "old processor names")


def test_convert_refuses_unknown_keys_and_unsupported_variants(tmp_path, capsys):
    from safetensors.numpy import save_file

    down, up = np.zeros((2, 8), np.float32), np.zeros((8, 2), np.float32)
    cases = {
        "unknown": (
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_z.lora_down.weight": down,
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_z.lora_up.weight": up,
            },
            "attn1_to_z",
        ),
        "dora": (
            {
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector": up[:, 0],
            },
            "DoRA",
        ),
        "loha": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a": down}, "LoHa"),
        "lokr": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1": down}, "LoKr"),
        "half": (
            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down},
            "needs down and up",
        ),
    }
    for name, (tensors, expect) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        rc = main(["lora", "convert", str(path), "-o", str(tmp_path / f"{name}_out.safetensors"), "--to", "peft"])
        err = capsys.readouterr().err
        assert rc == 2 and expect in err and err.startswith("error: ") and "Traceback" not in err, (name, err)
        assert not (tmp_path / f"{name}_out.safetensors").exists()
    rc = main(["lora", "inspect", str(tmp_path / "unknown.safetensors")])
    out = capsys.readouterr().out
    assert rc == 0 and "unmatched keys (no module of this structure) (2)" in out and "attn1_to_z" in out


def test_conv_and_tucker_deltas_equal_the_layer_chain():
    """LoCon (3x3 down, 1x1 up) and Tucker (1x1 down, 3x3 mid, 1x1 up): delta == the composed convolutions."""
    import torch
    import torch.nn.functional as F

    from sdxl_ckpt.formats.entries import entry_from_array

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((1, 6, 9, 9)), dtype=torch.float64)
    down3, up = rng.standard_normal((3, 6, 3, 3)), rng.standard_normal((5, 3, 1, 1))
    down1, mid = rng.standard_normal((3, 6, 1, 1)), rng.standard_normal((3, 3, 3, 3))
    t = lambda a: torch.tensor(a)  # noqa: E731
    e = lambda n, a: entry_from_array(n, a.astype(np.float32))  # noqa: E731
    chain = F.conv2d(F.conv2d(x, t(down3), padding=1), t(up))
    delta = lora_delta(e("d", down3), e("u", up), None, 0.5).astype(np.float64)
    assert torch.allclose(F.conv2d(x, t(delta), padding=1), 0.5 * chain, atol=1e-4)
    chain = F.conv2d(F.conv2d(F.conv2d(x, t(down1)), t(mid), padding=1), t(up))
    delta = lora_delta(e("d", down1), e("u", up), e("m", mid), 2.0).astype(np.float64)
    assert torch.allclose(F.conv2d(x, t(delta), padding=1), 2.0 * chain, atol=1e-4)


# --- merges equal diffusers' own fuse -------------------------------------------------------------------------------


def _fused_sd(tiny_base: Path, lora: Path) -> dict[str, np.ndarray]:
    """diffusers' load_lora_weights + fuse_lora, read back under SD names with the project's diffusers -> SD rules."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxl_ckpt.keymaps.diffusers_sd import SD_PREFIXES, map_component_keys
    from sdxl_ckpt.keymaps.transforms import TRANSFORMS

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base, torch_dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        state = {}
        for key, value in model.state_dict().items():
            if component != "unet" and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key
            state[key] = value.detach().numpy()
        cmap = map_component_keys(
            component,
            state,
            dict(model.config.to_dict()) if component != "unet" else model.config,
            SD_PREFIXES["base"][component],
        )
        for target in cmap.targets:
            out[target.name] = TRANSFORMS[target.transform].forward([state[s] for s in target.sources])
    return out


@pytest.mark.parametrize("fmt", ["peft", "kohya-diffusers", "kohya-sgm", "peft-ours"])
def test_merge_equals_diffusers_fuse(fmt, tiny_base, base_sd, base_lora, tmp_path):
    """kohya-sgm and peft-ours are our conversions of diffusers' kohya file: diffusers must load them as we do
    (peft-ours carries several ranks and alphas per component: rank_pattern / alpha_pattern in its metadata)."""
    lora = base_lora["peft" if fmt == "peft" else "kohya"]
    if fmt in ("kohya-sgm", "peft-ours"):
        to = "kohya" if fmt == "kohya-sgm" else "peft"
        _convert(lora, tmp_path / "ours.safetensors", to)
        lora = tmp_path / "ours.safetensors"
    report = _merge(base_sd, [lora], tmp_path / "merged.safetensors")
    merged = _tensors(tmp_path / "merged.safetensors")
    base = _tensors(base_sd)
    fused = _fused_sd(tiny_base, lora)
    touched = {row["tensor"] for row in report["touched"]}
    changed = {k for k, v in fused.items() if not np.array_equal(v, to_float32(base[k][1], base[k][0]))}
    assert touched == changed and len(touched) > 300
    for key, value in fused.items():
        got = to_float32(merged[key][1], merged[key][0])
        if fmt == "kohya-sgm" and key.startswith("conditioner.embedders.0.") and key.endswith(".mlp.fc1.weight"):
            # diffusers 0.42 with a transformers >= 5.6 CLIP (no text_model level) keeps the per-module alpha of
            # sd-scripts' lora_te1_text_model_* names only for the weights, not for alpha_pattern: these fc1
            # modules (alpha 5) fuse at the component's alpha 3. Our merge keeps alpha 5.
            base_value = to_float32(base[key][1], base[key][0])
            assert np.allclose(value - base_value, (3 / 5) * (got - base_value), rtol=0, atol=1e-6), key
            continue
        assert np.abs(got - value).max() <= 1e-6 * max(1.0, float(np.abs(value).max())), key
    for key in set(merged) - touched:
        assert merged[key][0] == base[key][0] and merged[key][1].tobytes() == base[key][1].tobytes(), key


def test_merge_in_every_layout(tiny_base, base_sd, base_lora, tmp_path):
    """diffusers folder, SD file and MindSpore ckpt bases give the same merged tensors; SD -> ckpt equals st-to-ms."""
    from sdxl_ckpt.convert.sd_ms import st_to_ms

    lora = base_lora["kohya"]
    from_sd = _merge(base_sd, [lora], tmp_path / "a.safetensors", "--ratio", "0.7")
    _merge(tiny_base, [lora], tmp_path / "b.safetensors", "--ratio", "0.7")
    a, b = _tensors(tmp_path / "a.safetensors"), _tensors(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(a[k][1].tobytes() == b[k][1].tobytes() for k in a)
    _merge(base_sd, [lora], tmp_path / "c.ckpt", "--ratio", "0.7", "--to", "ckpt")
    st_to_ms(tmp_path / "a.safetensors", tmp_path / "a.ckpt")
    st_to_ms(base_sd, tmp_path / "base.ckpt")
    _merge(tmp_path / "base.ckpt", [lora], tmp_path / "d.ckpt", "--ratio", "0.7")
    want = _tensors(tmp_path / "a.ckpt")
    for name in ("c.ckpt", "d.ckpt"):
        got = _tensors(tmp_path / name)
        assert got.keys() == want.keys() and all(got[k][1].tobytes() == want[k][1].tobytes() for k in want), name
    # two LoRAs with ratios: the sum of both deltas
    two = _merge(base_sd, [lora, lora], tmp_path / "e.safetensors", "--ratio", "0.3", "--ratio", "0.4")
    e = _tensors(tmp_path / "e.safetensors")
    assert {r["loras"] for r in two["touched"]} == {2 * r["loras"] for r in from_sd["touched"]}  # qkv: 3 per LoRA
    for row in from_sd["touched"][:50]:
        assert np.allclose(e[row["tensor"]][1], a[row["tensor"]][1], atol=1e-6)


# --- mindone --------------------------------------------------------------------------------------------------------


def test_mindone_names_and_merge(tiny_base, base_sd, mindone_lora, base_lora, tmp_path):
    """Names are those mindone's SDXL gm LoRA networks declare (mindspore-lab/mindone, examples/stable_diffusion_xl):

    ``gm/modules/diffusionmodules/openaimodel.py`` class ``UNetModel_lora``: "for cell_name, cell in
    self.cells_and_names(): if isinstance(cell, (CrossAttention, MemoryEfficientCrossAttention)): ... cell.to_q =
    Dense_lora(...)" and likewise ``cell.to_k``, ``cell.to_v``, ``cell.to_out[0]``;
    ``gm/modules/embedders/modules.py`` class ``FrozenCLIPEmbedder_lora``: "if isinstance(cell, CLIPAttention):
    ... cell.k_proj = Dense_lora(...)", then ``v_proj``, ``q_proj``, ``out_proj``; class
    ``FrozenOpenCLIPEmbedder2_lora``: "Currently only support injection to dense layers in attention modules ...
    if isinstance(cell, MultiheadAttention): ... cell.out_proj = Dense_lora(...)";
    ``gm/modules/lora/layers.py`` class ``Dense``: "self.lora_A = nn.Dense(in_features, r, has_bias=False)",
    "self.lora_B = nn.Dense(r, out_features, has_bias=False)", "self.scaling = self.lora_alpha / self.r" with
    "lora_alpha = lora_alpha if lora_alpha is not None else r" (no alpha in the file; fp32 nn.Dense weights).
    So a LoRA parameter is the replaced Dense's parameter path + ``.lora_A.weight`` / ``.lora_B.weight``.
    """
    import re

    from sdxl_ckpt.convert.sd_ms import st_to_ms

    st_to_ms(base_sd, tmp_path / "base.ckpt")
    params = set(_tensors(tmp_path / "base.ckpt"))
    declared = {
        p.removesuffix(".weight")
        for p in params
        if re.fullmatch(r"model\.diffusion_model\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight", p)
        or re.fullmatch(r"conditioner\.embedders\.0\.transformer\..*\.self_attn\.(q|k|v|out)_proj\.weight", p)
        or re.fullmatch(r"conditioner\.embedders\.1\.model\..*\.attn\.out_proj\.weight", p)
    }
    report = _convert(mindone_lora["peft"], tmp_path / "lora.ckpt", "mindone")
    assert "folded into lora_B" in " ".join(report["notes"])
    written = _tensors(tmp_path / "lora.ckpt")
    assert set(written) == {f"{m}.lora_{ab}.weight" for m in declared for ab in "AB"}
    assert all(dtype == "F32" and value.ndim == 2 for dtype, value in written.values())
    rank_of = {g.module.sd_module: g.rank for g in read_lora(mindone_lora["peft"]).groups}
    for module, rank in rank_of.items():
        assert written[f"{module}.lora_A.weight"][1].shape[0] == rank
        assert written[f"{module}.lora_B.weight"][1].shape[1] == rank
    _assert_same_deltas(_deltas(tmp_path / "lora.ckpt"), _true(mindone_lora, "base"), "mindone ckpt")
    # a merged ckpt equals merging the converted mindone LoRA
    _merge(tmp_path / "base.ckpt", [mindone_lora["peft"]], tmp_path / "from_peft.ckpt")
    _merge(tmp_path / "base.ckpt", [tmp_path / "lora.ckpt"], tmp_path / "from_mindone.ckpt")
    a, b = _tensors(tmp_path / "from_peft.ckpt"), _tensors(tmp_path / "from_mindone.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert np.allclose(to_float32(a[key][1], a[key][0]), to_float32(b[key][1], b[key][0]), rtol=0, atol=1e-6), key
    # modules mindone declares no LoRA on are refused by name (or written on request)
    rc = main(["lora", "convert", str(base_lora["kohya"]), "-o", str(tmp_path / "x.ckpt"), "--to", "mindone"])
    assert rc == 2 and not (tmp_path / "x.ckpt").exists()


# --- end to end: verify a merged ckpt against diffusers running the LoRA ------------------------------------------


def test_verify_of_a_merged_ckpt_against_reference_lora(tiny_base, base_sd, base_lora, tmp_path, capsys):
    """``reference --lora`` runs diffusers' own LoRA layers (load_lora_weights, unfused); the merged ckpt runs in
    MindSpore. They agree at fp32 tolerance; the same LoRA merged with its alphas ignored fails, naming the stage."""
    from safetensors.numpy import save_file

    lora = base_lora["kohya"]
    ref = tmp_path / "ref.npz"
    argv = ["reference", str(tiny_base), "-o", str(ref), "--lora", str(lora), "--height", "32", "--width", "32"]
    assert main([*argv, "--quiet"]) == 0
    merged = tmp_path / "merged.ckpt"
    _merge(base_sd, [lora], merged, "--to", "ckpt")
    report_path = tmp_path / "verify.json"
    rc = main(["verify", str(merged), "--reference", str(ref), "--quiet", "--json", str(report_path)])
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert rc == 0 and report["passed"], report["first_failure"]
    assert all(s["rel_l2"] <= 1e-4 for s in report["stages"])
    # alpha ignored: the kohya file without its .alpha tensors merges at scale 1 instead of alpha / rank
    tensors = {n: v for n, (_dtype, v) in _tensors(lora).items() if not n.endswith(".alpha")}
    no_alpha = tmp_path / "no_alpha.safetensors"
    save_file(tensors, str(no_alpha))
    wrong = tmp_path / "wrong.ckpt"
    _merge(base_sd, [no_alpha], wrong, "--to", "ckpt")
    rc = main(["verify", str(wrong), "--reference", str(ref), "--quiet", "--json", str(report_path)])
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert rc == 1 and report["first_failure"] == "text_encoder_1" and "text_encoder_1" in out


def test_lora_commands_without_torch(base_sd, mindone_lora, tmp_path):
    """inspect, convert and merge run on a MindSpore-only machine: torch, diffusers, transformers blocked."""
    from test_no_torch import run_without_torch

    lora = mindone_lora["peft"]
    steps = [
        ("lora", "inspect", str(lora)),
        ("lora", "convert", str(lora), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya", "-q"),
        ("lora", "convert", str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "m.ckpt"), "--to", "mindone", "-q"),
        ("lora", "merge", str(base_sd), str(tmp_path / "m.ckpt"), "-o", str(tmp_path / "x.ckpt"), "--to", "ckpt", "-q"),
    ]
    for step in steps:
        result = run_without_torch(*step)
        assert result.returncode == 0, (step[:2], result.stdout[-2000:], result.stderr[-2000:])
    assert (tmp_path / "x.ckpt").is_file()
