"""The ``sdxl-ckpt`` command line: thin Typer commands over the library; errors become one line + exit code.

Each command composes a reader, a name map and a writer from the subpackages, then prints its report.
Exit codes are listed in ``sdxl_ckpt.errors``.
"""

from __future__ import annotations

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


@app.callback()
def _root() -> None:
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

KEYS = typer.Option("auto", "--keys", help="auto | base | refiner | lcm (auto: from sentinel keys and metadata).")


@app.command("st-to-ms")
def st_to_ms_cmd(
    src: str = typer.Argument(..., help="SD single-file .safetensors (sgm names)."),
    output: str = typer.Option(..., "--output", "-o", help="MindSpore .ckpt (or .safetensors) to write."),
    keys: str = KEYS,
    dtype: str = typer.Option("keep", "--dtype", help="keep | fp16 | fp32 | bf16: cast floating tensors only."),
    fmt: str = typer.Option("ckpt", "--format", help="ckpt | safetensors (MindSpore names in safetensors)."),
    key_torch: Optional[str] = typer.Option(None, "--key-torch", help="mindone torch key list (checked)."),  # noqa: UP045
    key_ms: Optional[str] = typer.Option(None, "--key-ms", help="mindone MindSpore key list (checked)."),  # noqa: UP045
    overwrite: bool = OVERWRITE,
    hash_: bool = HASH,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """SD safetensors -> MindSpore ckpt with mindone's names: checked first, streamed, bytes preserved."""
    from sdxl_ckpt.convert.sd_ms import render_report, st_to_ms
    from sdxl_ckpt.report import write_json

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
    from sdxl_ckpt.report import write_json

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
GEN_STRENGTH = typer.Option(0.5, "--strength", help="Refiner img2img strength: runs int(steps*strength) steps.")
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
    strength: float,
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
    strength: float = GEN_STRENGTH,
    unet: Optional[str] = GEN_UNET,  # noqa: UP045
    config: Optional[str] = GEN_CONFIG,  # noqa: UP045
    overwrite: bool = OVERWRITE,
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Run diffusers' SDXL pipeline (torch) on SRC and store every stage verify compares (needs the reference extra)."""
    from sdxl_ckpt.proof_commands import reference_command

    return reference_command(
        src,
        output,
        json_out=json_out,
        quiet=quiet,
        overwrite=overwrite,
        sampler=sampler,
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
    strength: float = GEN_STRENGTH,
    unet: Optional[str] = GEN_UNET,  # noqa: UP045
    config: Optional[str] = GEN_CONFIG,  # noqa: UP045
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failing stage."),
    json_out: Optional[str] = JSON_OUT,  # noqa: UP045
    quiet: bool = QUIET,
) -> int:
    """Compare the MindSpore runtime with the reference stage by stage; exit 1 naming the first failing stage."""
    from sdxl_ckpt.proof_commands import verify_command

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

    report = inspect_checkpoint(path, keys=keys, with_hash=hash_, quiet=quiet, weight_variant=variant)
    if json_out != "-":
        print(render_inspect(report))
    warn_report(report)
    write_json(report, json_out)
    return 0


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

    report = diff_checkpoints(a, b, keys=keys, quiet=quiet, weight_variant=variant)
    if json_out != "-":
        print(render_diff(report))
    warn_diff(report)
    write_json(report, json_out)
    return 0 if report["identical"] else 1


# --- start-up ---


def _plain_coercion() -> None:
    """Let typer pass plain ``str`` / ``bool`` option values through without building a pydantic validator.

    typer >= 0.26 validates every parameter with a pydantic ``TypeAdapter``; importing pydantic and building the
    adapters costs ~0.15 s, half of a small conversion. For a ``str`` parameter without path checks, choices or a
    custom parser the adapter returns the command-line string unchanged, and a ``bool`` flag arrives as a bool: such
    values are returned as they are, anything else still goes through typer's own validation (older typer has
    no adapters and is left alone).
    """
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer.core import _TyperParameter
    except ImportError:
        return
    original = _TyperParameter.get_runtime_param

    class _Plain(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, self.annotation):
                return value
            return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    def get_runtime_param(self: Any) -> Any:
        if getattr(self, "_runtime_param", None) is None:
            desc = getattr(self, "type_descriptor", None)
            info = getattr(desc, "parameter_info", None)
            if (
                desc is not None
                and desc.annotation in (str, bool)
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
    """SIGINT, raised past Typer: Typer turns a KeyboardInterrupt into a silent exit 130, and the user must be told."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted()


def main(argv: Optional[list[str]] = None) -> int:  # noqa: UP045 - Typer-friendly annotation
    """Entry point: run the app, turning our errors into one stderr line and an exit code (no traceback)."""
    if hasattr(signal, "SIGXFSZ"):
        # a file-size limit must surface as an OSError (EFBIG) we can report, not kill the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_sigint = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):  # an ignored SIGINT (nohup, &) stays so
        previous_sigint = signal.signal(signal.SIGINT, _raise_interrupted)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="sdxl-ckpt", standalone_mode=False)
    except SdxlCkptError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (_Interrupted, KeyboardInterrupt, *_ABORT):
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except _CLICK_ERROR as err:
        err.show(file=sys.stderr)
        return err.exit_code
    except _EXIT as err:
        return err.exit_code
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
