"""One error hierarchy for lora-edge.

Every message says what is wrong, names the file or field, and says what to do.
The CLI turns any LoraEdgeError into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoraEdgeError(Exception):
    """Base class of every error lora-edge raises on purpose (user mistakes, bad files)."""


class InputError(LoraEdgeError, ValueError):
    """A path, option or value given by the user is wrong."""


class ModelError(LoraEdgeError, ValueError):
    """The base model cannot be read, or is an architecture lora-edge does not handle."""


class AdapterError(LoraEdgeError, ValueError):
    """A PEFT adapter cannot be read, does not fit the base, or uses an unsupported feature."""


class UnsupportedFeatureError(AdapterError):
    """An adapter_config field asks for something lora-edge cannot compile exactly."""


class PackageError(LoraEdgeError, ValueError):
    """A lora-edge package is missing, corrupt, tampered with, or from a newer version."""


class RuntimeInputError(LoraEdgeError, ValueError):
    """A request to a loaded model is invalid (unknown adapter, prompt too long, ...)."""


class KernelError(LoraEdgeError, RuntimeError):
    """The native kernel cannot be found, built or loaded."""
