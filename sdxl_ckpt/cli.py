"""The ``sdxl-ckpt`` command line: thin Typer commands over the library; errors become one line + exit code.

Each command composes a reader, a name map and a writer from the subpackages, then prints its report.
Exit codes are listed in ``sdxl_ckpt.errors``.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

import click
import typer

from sdxl_ckpt.errors import SdxlCkptError

app = typer.Typer(
    name="sdxl-ckpt",
    help="Convert SDXL weights between diffusers, SD single-file and MindSpore ckpt, and verify them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
JSON_OUT = typer.Option(None, "--json", help="Also write the report as JSON to this file ('-' = stdout).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output file.")

# Commands are added below, one section per job; keep each body a short composition of library calls.

# --- tiny-model (issue 3) ---

# --- diffusers-to-sd (issue 3) ---

# --- keymaps, st-to-ms, ms-to-st (issue 4) ---

# --- reference, verify, demo (issue 6) ---

# --- inspect, diff, hash (issue 8) ---


def main(argv: Optional[list[str]] = None) -> int:  # noqa: UP045 - Typer-friendly annotation
    """Entry point: run the app, turning our errors into one stderr line and an exit code (no traceback)."""
    if hasattr(signal, "SIGXFSZ"):
        # a file-size limit must surface as an OSError (EFBIG) we can report, not kill the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="sdxl-ckpt", standalone_mode=False)
    except SdxlCkptError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Abort:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except click.ClickException as err:
        err.show(file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
