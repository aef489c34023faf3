"""The `lora-edge` command: options -> typed config -> one library call -> render.

Only the CLI prints. A LoraEdgeError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time

import click

from .. import __version__
from ..errors import LoraEdgeError


class UserError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoraEdgeError as exc:
            raise UserError(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-edge")
def cli() -> None:
    """Compile a base model + PEFT LoRA adapters into an ONNX package, and run it on device.

    \b
      lora-edge export BASE --adapter pirate=adapters/pirate -o pkg/
      lora-edge inspect pkg/
      lora-edge run pkg/ --adapter pirate --prompt "What is the capital of Italy?"
    """


def progress_reporter(start: float):
    def report(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    return report


def choice(kind) -> click.Choice:
    """A click choice built from an option enum (lora_edge.config.Choice)."""
    return click.Choice(kind.values())


def main() -> None:
    try:
        cli.main(prog_name="lora-edge")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
