"""`lora-edge serve`: an OpenAI-compatible HTTP server over a package (GET /v1/models, POST /v1/chat/completions,
POST /v1/completions), where ``model`` picks the adapter. Device side only: onnxruntime, numpy, tokenizers, plus
Starlette and uvicorn from the ``serve`` extra, imported when a server is built, not by ``import lora_edge.serve``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .options import ServeOptions

EXTRA_HINT = "lora-edge serve needs the serve extra: pip install 'lora-edge[serve]'"


def missing_extra() -> str | None:
    """The module of the serve extra that is not installed, or None."""
    import importlib.util

    return next((m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None), None)


def load_app(package, options: ServeOptions | None = None, threads: int | None = None):
    """Load ``package`` and build its ASGI app (``app.state.api.model_ids``: what it serves). The base model's id
    is the package directory's name ("base" where an adapter has that name)."""
    from ..runtime import DecoderModel, load
    from .app import build_app

    options = options or ServeOptions()
    model = load(package, threads=threads)
    if not isinstance(model, DecoderModel):
        raise InputError(f"{package} is an encoder package; lora-edge serve serves decoders (text generation)")
    return build_app(model, name=Path(package).resolve().name, options=options)


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import sys

    import uvicorn

    # The generation thread gives up the GIL for every ONNX Runtime call and must take it back after; with the
    # default 5 ms switch interval it can wait that long behind the event loop each token. 1 ms keeps the wait small.
    sys.setswitchinterval(0.001)

    # A short graceful shutdown: on Ctrl-C, open streams are cut after it instead of holding the process.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)


__all__ = ["EXTRA_HINT", "ServeOptions", "load_app", "missing_extra", "run"]
