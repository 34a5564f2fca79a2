"""The ``sdxl-ckpt`` command line: thin Typer commands over the library; errors become one line + exit code.

Each command composes a reader, a name map and a writer from the subpackages, then prints its report.
Exit codes are listed in ``sdxl_ckpt.errors``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

import typer

from sdxl_ckpt.errors import SdxlCkptError

# typer >= 0.26 runs on its own vendored click, whose exceptions are not click's: catch both kinds. Plain click is
# only looked at when typer itself imported it (older typer): importing it just for these names costs start-up time
_click = sys.modules.get("click")
_ABORT: tuple[type[BaseException], ...] = (typer.Abort,)
_EXIT: tuple[type[BaseException], ...] = (typer.Exit,)
_CLICK_ERROR: tuple[type[Exception], ...] = ()
if _click is not None:
    _ABORT += (_click.exceptions.Abort,)
    _EXIT += (_click.exceptions.Exit,)
    _CLICK_ERROR += (_click.ClickException,)
try:
    from typer._click.exceptions import ClickException as _TyperClickException

    _CLICK_ERROR += (_TyperClickException,)
except ImportError:  # older typer: plain click only
    pass

app = typer.Typer(
    name="sdxl-ckpt",
    help="Convert SDXL weights between diffusers, SD single-file and MindSpore ckpt, and verify them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: formatting it with rich costs ~0.2 s of start-up per call
)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
JSON_OUT = typer.Option(None, "--json", help="Also write the report as JSON to this file ('-' = stdout).")
HASH = typer.Option(
    False,
    "--hash",
    help="Also sha256 the tensor bytes as they are written (report: content_sha256; safetensors outputs store it "
    "as modelspec.hash_sha256). ~0.7 s of CPU per GB.",
)
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output file.")
# the model kind; ``--variant`` keeps diffusers' meaning (weights variant such as fp16) and is only an old alias here
MODEL_KINDS = "base | refiner | lcm"
OLD_VARIANT = typer.Option(None, "--variant", hidden=True, help="Old spelling of --model.")


def _model_kind(model: str | None, old_variant: str | None, default: str | None = None) -> str:
    """``--model`` (or its old spelling ``--variant``, with a note on stderr); a missing one is a usage error."""
    if old_variant is not None:
        print(
            "note: --variant base|refiner|lcm is now --model (--variant means a weights variant such as fp16)",
            file=sys.stderr,
        )
        if model is not None and model != old_variant:
            raise typer.BadParameter(f"--model {model} and --variant {old_variant} disagree")
        model = old_variant
    if model is None:
        if default is None:
            raise typer.BadParameter(f"Missing option '--model' ({MODEL_KINDS})")
        return default
    return model


def _print_version(value: bool) -> None:
    if value:
        from sdxl_ckpt import __version__

        print(f"sdxl-ckpt {__version__}")
        raise typer.Exit(0)


def _json_apart(json_out: str | None, *paths: str | None) -> None:
    """``--json FILE`` must not be one of the command's inputs or outputs (it would replace them with a report)."""
    if json_out is not None and json_out != "-":
        from pathlib import Path

        from sdxl_ckpt.errors import OutputIsInputError
        from sdxl_ckpt.formats.atomic import check_not_an_input

        for other in paths:  # also the output, which does not exist yet
            if other is not None and os.path.realpath(json_out) == os.path.realpath(other):
                raise OutputIsInputError(f"--json names {other}, a file this command reads or writes", path=json_out)
        check_not_an_input(Path(json_out), paths)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Convert SDXL weights between diffusers, SD single-file and MindSpore ckpt, and verify them."""
    # an explicit callback keeps `sdxl-ckpt COMMAND` a group even while only one command exists


# Commands are added below, one section per job; keep each body a short composition of library calls.

# --- tiny-model ---


@app.command("tiny-model")
def tiny_model_cmd(
    model: Optional[str] = typer.Option(None, "--model", help=f"{MODEL_KINDS} (lcm adds DIR/lcm-unet)."),  # noqa: UP045
    old_variant: Optional[str] = OLD_VARIANT,  # noqa: UP045
    output: str = typer.Option(..., "--output", "-o", help="Pipeline folder to write."),
    seed: int = typer.Option(0, "--seed", help="Same seed -> byte-identical weights."),
    cond_proj: bool = typer.Option(False, "--cond-proj", help="lcm: give the LCM UNet a guidance embedding."),
    fp16_variant: Optional[bool] = typer.Option(  # noqa: UP045 - Typer-friendly annotation
        None,
        "--fp16-variant/--no-fp16-variant",
        help="fp16 weights as *.fp16.safetensors (default: off for tiny, on for --full).",
    ),
    full: bool = typer.Option(False, "--full", help="Real SDXL shapes, random data, streamed (fp16: ~7 GB base)."),
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> int:
    """Write a random SDXL-shaped diffusers folder (tiny widths, or real shapes with --full), offline."""
    from sdxl_ckpt.testmodels.tiny import build_model_cli

    fp16 = full if fp16_variant is None else fp16_variant
    path = build_model_cli(
        _model_kind(model, old_variant),
        output,
        seed=seed,
        cond_proj=cond_proj,
        variant_fp16=fp16,
        full=full,
        overwrite=overwrite,
        quiet=quiet,
    )
    if not quiet:
        print(f"wrote {path}")
    return 0


# --- diffusers-to-sd ---


@app.command("diffusers-to-sd")
def diffusers_to_sd_cmd(
    src_dir: str = typer.Argument(..., help="diffusers SDXL pipeline folder (unet/ vae/ text_encoder*/)."),
    output: str = typer.Option(..., "--output", "-o", help="SD single-file .safetensors to write."),
    unet: Optional[str] = typer.Option(None, "--unet", help="Take the UNet from this folder (e.g. an LCM UNet)."),  # noqa: UP045
    vae: Optional[str] = typer.Option(None, "--vae", help="Take the VAE from this folder."),  # noqa: UP045
    variant: Optional[str] = typer.Option(None, "--variant", help="Read *.VARIANT.safetensors weights (e.g. fp16)."),  # noqa: UP045
    dtype: str = typer.Option(
        "keep",
        "--dtype",
        help="keep | fp16 | fp32 | bf16: cast floating tensors only "
        "(integer tensors such as position_ids never change).",
    ),
    lcm: bool = typer.Option(False, "--lcm", help="Mark the output as LCM (the UNet is a distilled LCM UNet)."),
    overwrite: bool = OVERWRITE,
    hash_: bool = HASH,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Merge a diffusers SDXL folder (base, refiner or LCM) into one SD-layout safetensors file, streaming."""
    from sdxl_ckpt.convert.diffusers_to_sd import convert_diffusers_to_sd, render_report
    from sdxl_ckpt.report import write_json

    _json_apart(json_out, src_dir, output, unet, vae)
    report = convert_diffusers_to_sd(
        src_dir,
        output,
        unet_dir=unet,
        vae_dir=vae,
        variant=variant,
        dtype=None if dtype == "keep" else dtype,
        lcm=lcm,
        overwrite=overwrite,
        quiet=quiet,
        hash_content=hash_,
    )
    if json_out != "-":
        print(render_report(report))
    write_json(report, json_out)
    return 0


# --- keymaps, st-to-ms, ms-to-st ---

KEYS = typer.Option(
    "auto", "--keys", help="auto, or a variant (base, refiner, lcm, inpaint...): auto reads it from the weights."
)


@app.command("st-to-ms")
def st_to_ms_cmd(
    src: str = typer.Argument(..., help="SD single-file .safetensors (sgm names)."),
    output: str = typer.Option(..., "--output", "-o", help="MindSpore .ckpt (or .safetensors) to write."),
    keys: str = KEYS,
    dtype: str = typer.Option("keep", "--dtype", help="keep | fp16 | fp32 | bf16: cast floating tensors only."),
    fmt: Optional[str] = typer.Option(  # noqa: UP045
        None, "--format", help="ckpt | safetensors; default: from the output's extension (.ckpt / .safetensors)."
    ),
    key_torch: Optional[str] = typer.Option(None, "--key-torch", help="mindone torch key list (checked)."),  # noqa: UP045
    key_ms: Optional[str] = typer.Option(None, "--key-ms", help="mindone MindSpore key list (checked)."),  # noqa: UP045
    vae: Optional[str] = typer.Option(  # noqa: UP045
        None, "--vae", help="Take the VAE from this SD or LDM VAE safetensors (required when SRC has none)."
    ),
    overwrite: bool = OVERWRITE,
    hash_: bool = HASH,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """SD safetensors -> MindSpore ckpt with mindone's names: checked first, streamed, bytes preserved."""
    from sdxl_ckpt.convert.sd_ms import render_report, st_to_ms
    from sdxl_ckpt.report import error_report, write_json

    _json_apart(json_out, src, output, key_torch, key_ms)
    with error_report("st-to-ms", json_out):
        report = st_to_ms(
            src,
            output,
            keys=keys,
            dtype=dtype,
            fmt=fmt,
            overwrite=overwrite,
            quiet=quiet,
            key_torch=key_torch,
            key_ms=key_ms,
            vae=vae,
            hash_content=hash_,
        )
    if json_out != "-":
        print(render_report(report))
    write_json(report, json_out)
    return 0


@app.command("ms-to-st")
def ms_to_st_cmd(
    src: str = typer.Argument(..., help="MindSpore .ckpt (or MindSpore-named .safetensors)."),
    output: str = typer.Option(..., "--output", "-o", help="SD single-file .safetensors to write."),
    keys: str = KEYS,
    overwrite: bool = OVERWRITE,
    hash_: bool = HASH,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """MindSpore ckpt -> SD safetensors, record by record; position_ids and SD metadata restored."""
    from sdxl_ckpt.convert.sd_ms import ms_to_st, render_report
    from sdxl_ckpt.report import error_report, write_json

    _json_apart(json_out, src, output)
    with error_report("ms-to-st", json_out):
        report = ms_to_st(src, output, keys=keys, overwrite=overwrite, quiet=quiet, hash_content=hash_)
    if json_out != "-":
        print(render_report(report))
    write_json(report, json_out)
    return 0


keymaps_app = typer.Typer(help="The SD <-> MindSpore keymaps.", no_args_is_help=True)
app.add_typer(keymaps_app, name="keymaps")


@keymaps_app.command("export")
def keymaps_export_cmd(
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_KINDS),  # noqa: UP045
    old_variant: Optional[str] = OLD_VARIANT,  # noqa: UP045
    fmt: str = typer.Option("mindone", "--format", help="mindone: torch_key_V.yaml + mindspore_key_V.yaml."),
    output: str = typer.Option(".", "--output", "-o", help="Folder to write the two lists into."),
    overwrite: bool = OVERWRITE,
) -> int:
    """Write a keymap as mindone's line-paired key lists (required keys), to diff with theirs."""
    from sdxl_ckpt.keymaps.mindone import write_export

    for path in write_export(_model_kind(model, old_variant), fmt, output, overwrite=overwrite):
        print(f"wrote {path}")
    return 0


# --- reference, verify, demo ---

SAMPLER = typer.Option("euler", "--sampler", help="euler | dpmpp_2m | lcm (each against its diffusers scheduler).")
GEN_STEPS = typer.Option(4, "--steps", help="Number of inference steps (refiner: of the full schedule).")
GEN_SEED = typer.Option(0, "--seed", help="Seed of the initial noise (torch.Generator on the CPU).")
GEN_GUIDANCE = typer.Option(5.0, "--guidance", help="Classifier-free guidance scale (LCM with w-embedding: w+1).")
GEN_STRENGTH = typer.Option(
    None, "--strength", help="img2img strength, runs int(steps*strength) steps (default: refiner 0.5, inpainting 1)."
)
GEN_IMAGE_GUIDANCE = typer.Option(1.5, "--image-guidance", help="instruct-pix2pix: image guidance scale.")
GEN_UNET = typer.Option(None, "--unet", help="A diffusers UNet folder replacing SRC's (e.g. an LCM UNet).")
GEN_CONFIG = typer.Option(None, "--config", help="SD file: a diffusers folder to take configs/tokenizers from.")


def _generation(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    height: int | None,
    width: int | None,
    seed: int,
    guidance: float,
    strength: float | None,
    unet: str | None,
    config: str | None,
) -> dict:
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "height": height,
        "width": width,
        "seed": seed,
        "guidance": guidance,
        "strength": strength,
        "unet": unet,
        "config_dir": config,
    }


@app.command("reference")
def reference_cmd(
    src: str = typer.Argument(..., help="diffusers SDXL folder or SD single-file .safetensors."),
    output: str = typer.Option(..., "--output", "-o", help="REF.npz to write."),
    prompt: str = typer.Option("a photograph of an astronaut riding a horse", "--prompt"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Default: none (base: zeros)."),  # noqa: UP045
    steps: int = GEN_STEPS,
    height: Optional[int] = typer.Option(None, "--height", help="Default: the UNet's sample size x 8."),  # noqa: UP045
    width: Optional[int] = typer.Option(None, "--width"),  # noqa: UP045
    seed: int = GEN_SEED,
    guidance: float = GEN_GUIDANCE,
    sampler: str = SAMPLER,
    strength: Optional[float] = GEN_STRENGTH,  # noqa: UP045
    unet: Optional[str] = GEN_UNET,  # noqa: UP045
    config: Optional[str] = GEN_CONFIG,  # noqa: UP045
    lora: Optional[str] = typer.Option(None, "--lora", help="Load this LoRA with diffusers' load_lora_weights."),  # noqa: UP045
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="--lora: its adapter weight."),
    image_guidance: float = GEN_IMAGE_GUIDANCE,
    overwrite: bool = OVERWRITE,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Run diffusers' SDXL pipeline (torch) on SRC and store every stage verify compares (needs the reference extra)."""
    from sdxl_ckpt.proof_commands import reference_command

    _json_apart(json_out, src, output, unet, config)
    return reference_command(
        src,
        output,
        json_out=json_out,
        quiet=quiet,
        overwrite=overwrite,
        sampler=sampler,
        lora=lora,
        lora_scale=lora_scale,
        image_guidance=image_guidance,
        **_generation(prompt, negative_prompt, steps, height, width, seed, guidance, strength, unet, config),
    )


@app.command("verify")
def verify_cmd(
    ckpt: str = typer.Argument(..., help="MindSpore .ckpt (or MindSpore-named .safetensors) to check."),
    reference: Optional[str] = typer.Option(None, "--reference", help="REF.npz written by 'reference'."),  # noqa: UP045
    source: Optional[str] = typer.Option(None, "--source", help="Instead: compute the reference now from SRC (torch)."),  # noqa: UP045, E501
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Must match the reference's (default: its own)."),  # noqa: UP045
    device: str = typer.Option("CPU", "--device", help="CPU | GPU | Ascend."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | fp16 (default tolerances per dtype)."),
    rtol_override: list[str] | None = typer.Option(
        None, "--rtol-override", help="STAGE=VALUE, repeatable; STAGE a name or group (step, image_levels)."
    ),  # noqa: UP045, E501
    save_reference: Optional[str] = typer.Option(None, "--save-reference", help="--source: also write REF.npz here."),  # noqa: UP045, E501
    prompt: str = typer.Option("a photograph of an astronaut riding a horse", "--prompt", help="--source only."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="--source only."),  # noqa: UP045
    steps: int = GEN_STEPS,
    height: Optional[int] = typer.Option(None, "--height", help="--source only."),  # noqa: UP045
    width: Optional[int] = typer.Option(None, "--width", help="--source only."),  # noqa: UP045
    seed: int = GEN_SEED,
    guidance: float = GEN_GUIDANCE,
    strength: Optional[float] = GEN_STRENGTH,  # noqa: UP045
    unet: Optional[str] = GEN_UNET,  # noqa: UP045
    config: Optional[str] = GEN_CONFIG,  # noqa: UP045
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failing stage."),
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Compare the MindSpore runtime with the reference stage by stage; exit 1 naming the first failing stage."""
    from sdxl_ckpt.proof_commands import verify_command

    _json_apart(json_out, ckpt, reference, source, save_reference, unet, config)
    return verify_command(
        ckpt,
        reference=reference,
        source=source,
        sampler=sampler,
        device=device,
        dtype=dtype,
        rtol_override=rtol_override,
        json_out=json_out,
        quiet=quiet,
        save_reference=save_reference,
        fail_fast=fail_fast,
        **_generation(prompt, negative_prompt, steps, height, width, seed, guidance, strength, unet, config),
    )


@app.command("demo")
def demo_cmd(
    model: Optional[str] = typer.Option(None, "--model", help=f"{MODEL_KINDS} (default base)."),  # noqa: UP045
    old_variant: Optional[str] = OLD_VARIANT,  # noqa: UP045
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Keep the files here (default: a temp folder)."),  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """tiny-model -> diffusers-to-sd -> st-to-ms -> reference -> verify on a built-in tiny SDXL, with the verdict."""
    from sdxl_ckpt.demo import run_demo

    return run_demo(_model_kind(model, old_variant, "base"), workdir, quiet=quiet)


# --- inspect, diff, hash ---


@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="SD / MindSpore safetensors, MindSpore .ckpt, or diffusers folder."),
    hash_: bool = typer.Option(
        False,
        "--hash",
        help="Read every tensor: sha256 (ModelSpec convention) per file and per component, and NaN / Inf counts.",
    ),
    keys: str = typer.Option("auto", "--keys", help="auto | base | refiner | lcm: keymap for MindSpore names."),
    variant: Optional[str] = typer.Option(None, "--variant", help="diffusers: read *.VARIANT.safetensors."),  # noqa: UP045
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Describe a checkpoint from its header / record scan: variant, components, dtypes, metadata, unknown keys."""
    from sdxl_ckpt.manage.inspect import inspect_checkpoint, render_inspect, warn_report
    from sdxl_ckpt.report import write_json

    _json_apart(json_out, path)
    report = inspect_checkpoint(path, keys=keys, with_hash=hash_, quiet=quiet, weight_variant=variant)
    if json_out != "-":
        print(render_inspect(report))
    warn_report(report)
    write_json(report, json_out)
    # a stored modelspec.hash_sha256 that the content does not match is a difference found by a check
    return 1 if any(row.get("stored_hash_matches") is False for row in report.get("hashes", [])) else 0


@app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., help="First checkpoint (any layout: SD / MindSpore safetensors, .ckpt, diffusers)."),
    b: str = typer.Argument(..., help="Second checkpoint (any layout)."),
    keys: str = typer.Option("auto", "--keys", help="auto | base | refiner | lcm: keymap for MindSpore names."),
    variant: Optional[str] = typer.Option(None, "--variant", help="diffusers: read *.VARIANT.safetensors."),  # noqa: UP045
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Compare two checkpoints under SD names, one tensor pair at a time; exit 0 identical, 1 different."""
    from sdxl_ckpt.manage.diff import diff_checkpoints, render_diff, warn_diff
    from sdxl_ckpt.report import write_json

    _json_apart(json_out, a, b)
    report = diff_checkpoints(a, b, keys=keys, quiet=quiet, weight_variant=variant)
    if json_out != "-":
        print(render_diff(report))
    warn_diff(report)
    write_json(report, json_out)
    return 0 if report["identical"] else 1


# --- sd-to-diffusers ---


@app.command("sd-to-diffusers")
def sd_to_diffusers_cmd(
    src: str = typer.Argument(..., help="SD single-file .safetensors, or MindSpore .ckpt (MindSpore names)."),
    output: str = typer.Option(..., "--output", "-o", help="diffusers pipeline folder to write."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Name weights *.VARIANT.safetensors (e.g. fp16)."),  # noqa: UP045
    dtype: str = typer.Option("keep", "--dtype", help="keep | fp16 | fp32 | bf16: cast floating tensors only."),
    max_shard_size: Optional[str] = typer.Option(  # noqa: UP045
        None, "--max-shard-size", help="Shard weights as save_pretrained does (e.g. 5GB), with the index json."
    ),
    tokenizers: Optional[str] = typer.Option(  # noqa: UP045
        None, "--tokenizers", help="Copy tokenizer/ and tokenizer_2/ from this diffusers folder."
    ),
    keys: str = typer.Option("auto", "--keys", help="auto | base | refiner | lcm (auto: from keys and metadata)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pipeline folder."),
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """SD file or MindSpore ckpt -> diffusers SDXL folder (unet, vae, text encoders, scheduler), streaming."""
    from sdxl_ckpt.convert.sd_to_diffusers import convert_sd_to_diffusers, render_report
    from sdxl_ckpt.report import write_json

    report = convert_sd_to_diffusers(
        src,
        output,
        variant=variant,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tokenizers=tokenizers,
        keys=keys,
        overwrite=overwrite,
        quiet=quiet,
    )
    if json_out != "-":
        print(render_report(report))
    write_json(report, json_out)
    return 0


# --- lora ---

lora_app = typer.Typer(help="LoRA files: inspect, convert between kohya / PEFT / mindone, merge into a checkpoint.")
app.add_typer(lora_app, name="lora", no_args_is_help=True)
LORA_ALPHA = typer.Option(
    None, "--alpha", help="Alpha for modules whose file stores none (PEFT without metadata, mindone; default = rank)."
)


@lora_app.command("inspect")
def lora_inspect_cmd(
    path: str = typer.Argument(..., help="LoRA .safetensors (kohya / PEFT / old diffusers) or mindone .ckpt."),
    alpha: Optional[float] = LORA_ALPHA,  # noqa: UP045
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Format, structure, ranks, alphas and targeted modules per component; keys no module has."""
    from sdxl_ckpt.lora.inspect import inspect_lora, render_inspect
    from sdxl_ckpt.report import write_json

    report = inspect_lora(path, alpha=alpha)
    if json_out != "-":
        print(render_inspect(report))
    write_json(report, json_out)
    return 0


@lora_app.command("convert")
def lora_convert_cmd(
    src: str = typer.Argument(..., help="LoRA file in any format lora inspect reads."),
    output: str = typer.Option(..., "--output", "-o", help="File to write (.safetensors; mindone: .ckpt)."),
    to: str = typer.Option(..., "--to", help="kohya | peft | mindone"),
    alpha: Optional[float] = LORA_ALPHA,  # noqa: UP045
    kohya_names: str = typer.Option("sgm", "--kohya-names", help="kohya UNet names: sgm (sd-scripts) | diffusers."),
    allow_undeclared: bool = typer.Option(
        False, "--allow-undeclared", help="mindone: also write modules its gm LoRA networks have no LoRA layer on."
    ),
    overwrite: bool = OVERWRITE,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Convert a LoRA name to name; the scale alpha / rank of every module is kept."""
    from sdxl_ckpt.lora.convert import convert_lora, render_convert
    from sdxl_ckpt.report import write_json

    report = convert_lora(
        src,
        output,
        to=to,
        alpha=alpha,
        kohya_names=kohya_names,
        allow_undeclared=allow_undeclared,
        overwrite=overwrite,
        quiet=quiet,
    )
    if json_out != "-":
        print(render_convert(report))
    write_json(report, json_out)
    return 0


@lora_app.command("merge")
def lora_merge_cmd(
    base: str = typer.Argument(..., help="SD / MindSpore safetensors, MindSpore .ckpt, or diffusers folder."),
    loras: list[str] = typer.Argument(..., help="One or more LoRA files."),
    output: str = typer.Option(..., "--output", "-o", help="Merged checkpoint to write."),
    ratio: list[float] | None = typer.Option(None, "--ratio", help="Weight of each LoRA, in order (default 1)."),
    to: Optional[str] = typer.Option(None, "--to", help="sd | ckpt (default: the base's layout; diffusers -> sd)."),  # noqa: UP045
    alpha: Optional[float] = LORA_ALPHA,  # noqa: UP045
    keys: str = typer.Option("auto", "--keys", help="auto | base | refiner | lcm: the base's keymap."),
    overwrite: bool = OVERWRITE,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Add LoRA deltas to a checkpoint, streaming; only the touched tensors change, the rest is copied byte for byte."""
    from sdxl_ckpt.lora.merge import merge_loras, render_merge
    from sdxl_ckpt.report import write_json

    report = merge_loras(
        base, loras, output, ratios=ratio, to=to, alpha=alpha, keys=keys, overwrite=overwrite, quiet=quiet
    )
    if json_out != "-":
        print(render_merge(report))
    write_json(report, json_out)
    return 0


# --- start-up ---


def _plain_coercion() -> None:
    """Let typer pass plain ``str`` / ``bool`` / ``int`` / ``float`` values through without a pydantic validator.

    typer >= 0.26 validates every parameter with a pydantic ``TypeAdapter``; importing pydantic and building the
    adapters costs ~0.15 s, half of a small conversion. For a ``str`` parameter without path checks, choices or a
    custom parser the adapter returns the command-line string unchanged, a ``bool`` flag arrives as a bool, and an
    ``int`` / ``float`` is the string parsed: such values are returned so, anything else (and a number that does
    not parse) still goes through typer's own validation (older typer has no adapters and is left alone).
    """
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer.core import _TyperParameter
    except ImportError:
        return
    original = _TyperParameter.get_runtime_param

    class _Plain(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if value is None or isinstance(value, self.annotation):  # None: an optional option not given
                return value
            if self.annotation in (int, float) and isinstance(value, str):
                try:
                    return self.annotation(value)
                except ValueError:
                    pass  # typer's own validation words the error
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            desc = getattr(self, "type_descriptor", None)
            info = getattr(desc, "parameter_info", None)
            if (
                desc is not None
                and desc.annotation in (str, bool, int, float)
                and desc.file_annotation is None
                and getattr(info, "parser", None) is None
                and not desc.is_path
                and not desc.is_choice
            ):
                self._runtime_param = _Plain(parameter_info=info, annotation=desc.annotation)
        return original(self)

    _TyperParameter.get_runtime_param = get_runtime_param


_plain_coercion()


class _Interrupted(BaseException):
    """A stop signal, raised past Typer: Typer turns a KeyboardInterrupt into a silent exit 130, and the user must
    be told. SIGTERM (timeout, schedulers) and SIGHUP (a dropped ssh) unwind the same way as Ctrl-C, so every
    temporary output is removed; the exit code is 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _install_stop_handlers() -> dict[int, object]:
    """Our handler for each stop signal still at its default (an ignored one, as under nohup, stays ignored)."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in _STOP_SIGNALS:
        current = signal.getsignal(signum)
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        if current is default:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    return previous


def _flags_without_type(command: object) -> None:
    """Typer's help shows every option's type, so a flag reads ``--overwrite <bool>`` as if it took a value;
    an empty metavar makes flags render as flags (``--overwrite``)."""
    for param in getattr(command, "params", ()):
        if getattr(param, "is_flag", False):
            param.metavar = ""
    help_option = getattr(command, "get_help_option", None)
    if help_option is not None:

        def flag_help(ctx: object, _make: object = help_option) -> object:
            option = _make(ctx)
            if option is not None:
                option.metavar = ""
            return option

        command.get_help_option = flag_help
    for sub in getattr(command, "commands", {}).values():
        _flags_without_type(sub)


def main(argv: Optional[list[str]] = None) -> int:  # noqa: UP045 - Typer-friendly annotation
    """Entry point: run the app, turning our errors into one stderr line and an exit code (no traceback)."""
    if hasattr(signal, "SIGXFSZ"):
        # a file-size limit must surface as an OSError (EFBIG) we can report, not kill the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = _install_stop_handlers()
    command = typer.main.get_command(app)
    _flags_without_type(command)
    try:
        result = command.main(args=argv, prog_name="sdxl-ckpt", standalone_mode=False)
    except SdxlCkptError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (_Interrupted, KeyboardInterrupt, *_ABORT) as err:
        signum = err.signum if isinstance(err, _Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        detail = "" if signum == signal.SIGINT else f" ({name})"
        print(f"error: interrupted{detail}; no output was written", file=sys.stderr)
        return 128 + signum
    except _CLICK_ERROR as err:
        err.show(file=sys.stderr)
        return err.exit_code
    except _EXIT as err:
        return err.exit_code
    except Exception as err:  # noqa: BLE001 - a fault we did not foresee still gets one line, never a traceback
        if os.environ.get("SDXL_CKPT_DEBUG"):
            raise
        where = f" in {err.filename}" if isinstance(err, OSError) and err.filename else ""
        text = " ".join(str(err).split())[:300]
        print(
            f"error: unexpected {type(err).__name__}{where}: {text} (SDXL_CKPT_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
