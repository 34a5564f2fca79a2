"""The tiny models must have the REAL SDXL key structure and be usable by diffusers offline.

Real key sets come from the real full-size configs instantiated on the meta device (names only, no memory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402

from sdxl_ckpt.cli import main  # noqa: E402
from sdxl_ckpt.sdxl.configs import FULL_CONFIGS, full_configs  # noqa: E402
from sdxl_ckpt.sdxl.tokenizers import byte_level_vocab  # noqa: E402
from sdxl_ckpt.testmodels.full import meta_model  # noqa: E402
from sdxl_ckpt.testmodels.tiny import build_tiny_model, tiny_configs  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _file_keys(folder: Path) -> set[str]:
    """Tensor names over all weight files of a component folder (plain, fp16 variant or sharded)."""
    keys: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as handle:
            keys.update(handle.keys())
    return keys


def _real_keys(variant: str, component: str) -> set[str]:
    keys = set(meta_model(component, full_configs(variant)[component]).state_dict())
    if component == "text_encoder":  # official layout: CLIP-L keys under text_model.
        keys = {k if k.startswith("text_model.") else "text_model." + k for k in keys}
    return keys


@pytest.fixture(scope="module")
def real_keys() -> dict[tuple[str, str], set[str]]:
    return {(v, c): _real_keys(v, c) for v in FULL_CONFIGS for c in FULL_CONFIGS[v]}


# --- structure ------------------------------------------------------------------------------------------------


def test_real_configs_give_the_published_sizes():
    """FULL_CONFIGS reproduce the published SDXL parameter counts (names and shapes, meta device)."""
    counts = {
        (v, c): sum(p.numel() for p in meta_model(c, cfg).parameters())
        for v, comps in FULL_CONFIGS.items()
        for c, cfg in comps.items()
    }
    assert counts[("base", "unet")] == 2_567_463_684
    assert counts[("base", "vae")] == 83_653_863
    assert counts[("base", "text_encoder")] == 123_060_480
    assert counts[("base", "text_encoder_2")] == 694_659_840


def test_real_key_counts(real_keys):
    assert len(real_keys[("base", "unet")]) == 1680
    assert len(real_keys[("base", "vae")]) == 248
    assert len(real_keys[("base", "text_encoder")]) == 196
    assert len(real_keys[("base", "text_encoder_2")]) == 517
    assert len(real_keys[("refiner", "unet")]) == 1220


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "text_encoder_2"])
def test_tiny_base_key_set_equals_real(tiny_base, real_keys, component):
    assert _file_keys(tiny_base / component) == real_keys[("base", component)]


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder_2"])
def test_tiny_refiner_key_set_equals_real(tiny_refiner, real_keys, component):
    assert _file_keys(tiny_refiner / component) == real_keys[("refiner", component)]
    assert not (tiny_refiner / "text_encoder").exists()
    assert not (tiny_refiner / "tokenizer").exists()


def test_tiny_lcm_unets(tiny_lcm, tiny_lcm_cond_proj, real_keys):
    base_unet = real_keys[("base", "unet")]
    assert _file_keys(tiny_lcm / "unet") == base_unet
    assert _file_keys(tiny_lcm / "lcm-unet") == base_unet
    assert _file_keys(tiny_lcm_cond_proj / "lcm-unet") == base_unet | {"time_embedding.cond_proj.weight"}
    config = json.loads((tiny_lcm_cond_proj / "lcm-unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == 16
    assert json.loads((tiny_lcm / "lcm-unet" / "config.json").read_text())["time_cond_proj_dim"] is None
    with safe_open(str(tiny_lcm_cond_proj / "lcm-unet" / "diffusion_pytorch_model.safetensors"), "np") as handle:
        assert handle.get_slice("time_embedding.cond_proj.weight").get_shape() == [32, 16]
    # the distilled UNet has other weights than the pipeline's own UNet
    name = "conv_in.weight"
    with (
        safe_open(str(tiny_lcm / "unet" / "diffusion_pytorch_model.safetensors"), "np") as a,
        safe_open(str(tiny_lcm / "lcm-unet" / "diffusion_pytorch_model.safetensors"), "np") as b,
    ):
        assert not np.array_equal(a.get_tensor(name), b.get_tensor(name))


def test_tiny_configs_only_shrink_widths():
    """Tiny configs differ from the real ones only in width/size fields, never in structure."""
    width_keys = {
        "block_out_channels",
        "attention_head_dim",
        "cross_attention_dim",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "sample_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "projection_dim",
        "vocab_size",
    }
    for variant in ("base", "refiner"):
        full, tiny = full_configs(variant), tiny_configs(variant)
        assert full.keys() == tiny.keys()
        for component in full:
            changed = {k for k in full[component] if full[component][k] != tiny[component][k]}
            assert changed <= width_keys, (variant, component, changed)
    assert tiny_configs("base")["unet"]["transformer_layers_per_block"] == [1, 2, 10]
    assert tiny_configs("refiner")["unet"]["transformer_layers_per_block"] == 4


# --- weights --------------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_same_seed_gives_identical_bytes(tiny_base, tmp_path):
    again = build_tiny_model("base", tmp_path / "again", seed=0)
    first = _weight_files(tiny_base)
    assert len(first) == 4
    assert _weight_files(again) == first


def test_other_seed_gives_other_weights(tiny_refiner, tmp_path):
    other = _weight_files(build_tiny_model("refiner", tmp_path / "other", seed=1))
    mine = _weight_files(tiny_refiner)
    assert other.keys() == mine.keys()
    assert all(other[k] != mine[k] for k in mine)


def test_every_tensor_is_distinct_and_non_constant(tiny_base):
    """No tensor left at its init constant (norm ones, zero biases): a swapped tensor must change outputs."""
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        seen: dict[str, str] = {}
        path = (
            tiny_base
            / component
            / ("model.safetensors" if "text" in component else "diffusion_pytorch_model.safetensors")
        )
        with safe_open(str(path), "np") as handle:
            for key in handle.keys():
                arr = handle.get_tensor(key)
                assert arr.dtype == np.float32, key
                assert arr.size == 1 or float(arr.std()) > 1e-3, key
                digest = hashlib.sha256(arr.tobytes()).hexdigest()
                assert digest not in seen, (key, seen.get(digest))
                seen[digest] = key


def test_text_projection_orientation(tiny_base):
    """HF stores (projection_dim, hidden); tiny widths differ, so a converter forgetting the transpose fails loudly."""
    with safe_open(str(tiny_base / "text_encoder_2" / "model.safetensors"), "np") as handle:
        proj = handle.get_tensor("text_projection.weight")
    assert proj.shape == (32, 64)


def test_fp16_variant_sharded_flat_clip(tmp_path, real_keys):
    out = build_tiny_model(
        "lcm",
        tmp_path / "v",
        seed=2,
        cond_proj=True,
        variant_fp16=True,
        unet_max_shard_size="20MB",
        clip_flat_keys=True,
    )
    assert (out / "text_encoder" / "model.fp16.safetensors").is_file()
    assert (out / "text_encoder_2" / "model.fp16.safetensors").is_file()
    assert (out / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not list(out.rglob("model.safetensors")) and not list(out.rglob("diffusion_pytorch_model.safetensors"))
    for unet in ("unet", "lcm-unet"):
        index = json.loads((out / unet / "diffusion_pytorch_model.safetensors.index.fp16.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and all(".fp16" in s and s.endswith(".safetensors") for s in shards)
        assert set(index["weight_map"]) == _file_keys(out / unet)
    assert _file_keys(out / "unet") == real_keys[("base", "unet")]
    flat = _file_keys(out / "text_encoder")
    assert flat == {k.removeprefix("text_model.") for k in real_keys[("base", "text_encoder")]}
    with safe_open(str(out / "vae" / "diffusion_pytorch_model.fp16.safetensors"), "np") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {np.dtype("float16")}

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    fp16 = {"dtype": torch.float16, "variant": "fp16", "local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(out / "lcm-unet", **fp16)
    pipe = StableDiffusionXLPipeline.from_pretrained(out, unet=unet, **fp16)
    assert pipe.unet.time_embedding.cond_proj.weight.dtype == torch.float16
    assert pipe.text_encoder.final_layer_norm.weight.dtype == torch.float16
    with safe_open(str(out / "text_encoder" / "model.fp16.safetensors"), "pt") as handle:
        np.testing.assert_array_equal(
            handle.get_tensor("final_layer_norm.weight").numpy(),
            pipe.text_encoder.final_layer_norm.weight.detach().numpy(),
        )


# --- offline use by diffusers ---------------------------------------------------------------------------------


def test_tokenizers_offline(tiny_base):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer", local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer_2", local_files_only=True)
    vocab = byte_level_vocab()
    assert len(vocab) == 514 and vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
    ids = tok("A cat!", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 512 and max(ids) == 513 and ids.index(513) == 1 + len("a") + len("cat") + len("!")
    assert ids[ids.index(513) :] == [513] * (77 - ids.index(513))  # tokenizer pads with <|endoftext|>
    ids2 = tok2("A cat", padding="max_length", max_length=77).input_ids
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0
    assert ids2[:5] == ids[:5] == [512, 320, 66, 64, 339]  # <sot> a</w> c a t</w>
    assert ids2[5] == 513 and set(ids2[6:]) == {0}  # tokenizer_2 pads with "!"
    assert tok.decode(ids, skip_special_tokens=True) == "a cat !"  # CLIP decodes every "</w>" as a space


def _generate(pipe, **kwargs):
    gen = torch.Generator().manual_seed(0)
    image = pipe(
        "a photo of a cat", num_inference_steps=1, height=32, width=32, output_type="np", generator=gen, **kwargs
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and float(image.std()) > 0.01
    return image


def test_base_pipeline_generates_offline(tiny_base):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base, local_files_only=True)
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast is True
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    first = _generate(pipe)
    np.testing.assert_array_equal(first, _generate(pipe))


def test_lcm_pipelines_generate_offline(tiny_lcm, tiny_lcm_cond_proj):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    images = []
    for folder in (tiny_lcm, tiny_lcm_cond_proj):
        unet = UNet2DConditionModel.from_pretrained(folder / "lcm-unet", local_files_only=True)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, unet=unet, local_files_only=True)
        images.append(_generate(pipe, guidance_scale=2.0))
    assert not np.array_equal(images[0], images[1])


def test_refiner_pipeline_runs_offline(tiny_refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_refiner, local_files_only=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True
    image = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    out = pipe(
        "a cat",
        image=image,
        num_inference_steps=2,
        strength=0.5,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_tiny_model(tmp_path, tiny_refiner, capsys):
    out = tmp_path / "ref"
    assert main(["tiny-model", "--model", "refiner", "-o", str(out), "--quiet"]) == 0
    assert _weight_files(out) == _weight_files(tiny_refiner)
    capsys.readouterr()

    assert main(["tiny-model", "--model", "refiner", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1

    (out / "stale.txt").write_text("old")
    assert main(["tiny-model", "--model", "refiner", "-o", str(out), "--seed", "1", "--overwrite", "-q"]) == 0
    assert not (out / "stale.txt").exists()
    assert _weight_files(out) != _weight_files(tiny_refiner)


def test_cli_refuses_bad_requests(tmp_path, capsys):
    other = tmp_path / "not_a_pipeline"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert main(["tiny-model", "--model", "base", "-o", str(other), "--overwrite", "-q"]) == 2
    assert (other / "precious.txt").read_text() == "keep me"
    assert main(["tiny-model", "--model", "sdxl", "-o", str(tmp_path / "x")]) == 2
    assert main(["tiny-model", "--model", "base", "--cond-proj", "-o", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    errs = capsys.readouterr().err
    assert "model_index.json" in errs and "unknown variant" in errs and "lcm variant only" in errs


# --- --full: the streaming random generator, run on the tiny configs through the same code path ----------------


def test_full_generator_on_tiny_configs(tmp_path, tiny_base, monkeypatch, capsys):
    from sdxl_ckpt.formats.safetensors_io import read_safetensors
    from sdxl_ckpt.testmodels import full as full_model

    # the CLI's --full path, with the real configs swapped for the tiny ones (no 7 GB in tests)
    monkeypatch.setattr(full_model, "full_configs", tiny_configs)
    out = tmp_path / "full"
    assert main(["tiny-model", "--model", "base", "--full", "-o", str(out), "-q"]) == 0
    files = {
        c: out / c / (("model" if "text" in c else "diffusion_pytorch_model") + ".fp16.safetensors")
        for c in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    for component, path in files.items():
        assert _file_keys(out / component) == _file_keys(tiny_base / component), component
        parsed = read_safetensors(path)
        assert parsed.metadata == {"format": "pt"}
        with safe_open(str(tiny_base / component / path.name.replace(".fp16", "")), "np") as ref:
            for entry in parsed.entries:
                assert entry.dtype == "F16"
                assert list(entry.shape) == ref.get_slice(entry.name).get_shape(), entry.name
    # values: bounded, non-constant, norm gains near 1, deterministic per (seed, name)
    with safe_open(str(files["text_encoder"]), "np") as handle:
        gain = handle.get_tensor("text_model.final_layer_norm.weight")
        bias = handle.get_tensor("text_model.final_layer_norm.bias")
        emb = handle.get_tensor("text_model.embeddings.token_embedding.weight")
    assert ((gain >= 1) & (gain < 2)).all() and gain.std() > 0
    assert (np.abs(bias) < 1 / 32).all() and (np.abs(emb) >= 1 / 128).all() and emb.std() > 0.01
    entries = {
        e.name: e
        for e in full_model.component_entries(
            "text_encoder", full_model.meta_model("text_encoder", tiny_configs("base")["text_encoder"]), 0, "F16"
        )
    }
    np.testing.assert_array_equal(entries["text_model.final_layer_norm.weight"].load(), gain)
    assert (json.loads((out / "text_encoder" / "config.json").read_text())["dtype"]) == "float16"

    # the folder loads and runs in diffusers
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(out, variant="fp16", dtype=torch.float32, local_files_only=True)
    _generate(pipe)

    # same seed -> same bytes; another seed -> other bytes
    again = full_model.build_full_model("base", tmp_path / "again", configs=tiny_configs("base"))
    assert _weight_files(again) == _weight_files(out)
    other = full_model.build_full_model(
        "refiner", tmp_path / "other", seed=1, variant_fp16=False, configs=tiny_configs("refiner")
    )
    assert (other / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert read_safetensors(other / "vae" / "diffusion_pytorch_model.safetensors").entries[0].dtype == "F32"
    assert not (other / "text_encoder").exists()


def test_full_cli_refuses_cond_proj(tmp_path, capsys):
    assert main(["tiny-model", "--model", "lcm", "--full", "--cond-proj", "-o", str(tmp_path / "f")]) == 2
    assert "--cond-proj" in capsys.readouterr().err and not (tmp_path / "f").exists()
