"""`adapters add|remove|list`: change a shipped package's adapter set without re-exporting its base."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .app import cli


@cli.group()
def adapters() -> None:
    """Add, remove and list a package's adapters; model.onnx is never touched.

    \b
    Examples:
      lora-edge adapters add pkg/ yoda=adapters/yoda
      lora-edge adapters add pkg/ dora=adapters/dora --base SmolLM2.gguf   # DoRA, biases: need the base's weights
      lora-edge adapters remove pkg/ yoda
      lora-edge adapters list pkg/
    """


@adapters.command("add")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("adapter", metavar="NAME=PEFT_DIR")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The package's base model (HF directory or .gguf): needed for DoRA, trained biases and modules_to_save.")
@click.option("--force", is_flag=True, help="Replace an adapter of the same name.")
@click.option("--quiet", is_flag=True, help="No progress lines or bars on stderr while --base loads.")
def add(package: Path, adapter: str, base: Path | None, force: bool, quiet: bool) -> None:
    """Compile a PEFT adapter against PACKAGE's slots and storage and add it."""
    from ..adapters.manage import add_adapter
    from ..config import AdapterSpec

    start = time.perf_counter()
    spec = AdapterSpec.parse(adapter)
    table = _base_modules(package, base, start, quiet) if base is not None else None
    manifest = add_adapter(package, spec.name, spec.path, table, replace=force)
    info = manifest.adapters[spec.name]
    click.echo(f"added {spec.name} to {package} ({info.kind}, rank {'/'.join(map(str, info.ranks))}, "
               f"{manifest.files[info.file].bytes / 2**20:.2f} MiB) in {time.perf_counter() - start:.1f}s")  # fmt: skip


@adapters.command("remove")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("name")
def remove(package: Path, name: str) -> None:
    """Remove adapter NAME from PACKAGE."""
    from ..adapters.manage import remove_adapter

    manifest = remove_adapter(package, name)
    click.echo(f"removed {name} from {package}; it has: {', '.join(manifest.adapter_files()) or 'no adapters'}")


@adapters.command("list")
@click.argument("package", type=click.Path(path_type=Path))
def list_(package: Path) -> None:
    """List PACKAGE's adapters: rank, alpha, kind, size, targets."""
    from ..package.inspect import adapter_lines, describe

    click.echo("\n".join(adapter_lines(describe(package))))


def _base_modules(package: Path, base: Path, start: float, quiet: bool):
    """The base model, checked to be the one the package was compiled from (compile side: torch)."""
    from ..compile.models.loader import load_base
    from ..compile.progress import Reporter, counting
    from ..errors import InputError
    from ..package.store import read_manifest

    progress = Reporter(start, quiet=quiet)
    progress(f"loading base model {base}")
    with counting(progress, "tensors read") as step:
        model, _ = load_base(base, step)
    if model.sha256 != read_manifest(package, verify=False).base.sha256:
        raise InputError(f"{base} is not the base {package} was compiled from (its weights' sha256 differs)")
    return model
