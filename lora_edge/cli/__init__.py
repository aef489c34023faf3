"""The `lora-edge` command, one module per group of commands; importing them registers them on the group."""

from . import adapters, chat, compile, device, profile, serve  # noqa: F401 (importing them registers the commands)
from .app import cli, main

__all__ = ["cli", "main"]
