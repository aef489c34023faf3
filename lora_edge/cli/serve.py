"""`serve`: an OpenAI-compatible HTTP server over a package."""

from __future__ import annotations

from pathlib import Path

import click

from .app import UserError, cli


@cli.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the network "
                   "(set --api-key then).")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="LORA_EDGE_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every /v1 request (default: $LORA_EDGE_API_KEY; none: open).")
@click.option("--threads", type=click.IntRange(1, None), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--max-queue", type=click.IntRange(1, None), default=64, show_default=True,
              help="Requests that may wait for a free row; more are answered 429 at once.")
@click.option("--parallel", type=click.IntRange(1, None), default=4, show_default=True,
              help="Requests decoded together, each with its own adapter (1: one after another).")
@click.option("--ctx-size", "context", type=click.IntRange(2, None), default=None,
              help="Tokens per request, prompt and answer (default: the model's context). The KV cache takes memory "
                   "only for the tokens used.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)  # fmt: skip
def serve(package: Path, host: str, port: int, api_key: str | None, threads: int | None, max_queue: int, parallel: int,
          context: int | None, log_level: str) -> None:  # fmt: skip
    """Serve PACKAGE over HTTP with OpenAI's API: GET /v1/models, POST /v1/chat/completions and POST /v1/completions,
    streaming or not. The request's "model" picks the adapter: the package directory's name is the base model, an
    adapter's name that adapter (GET /v1/models lists them). Up to --parallel requests decode together, whatever
    their adapters (a request joins at the next token and leaves when done); others wait in a queue.

    \b
    Examples:
      lora-edge serve pkg/
      lora-edge serve pkg/ --port 8080 --api-key secret --threads 4 --parallel 8
      # then, with URL the address it prints when it starts:
      curl "$URL/chat/completions" -H 'Content-Type: application/json' \\
           -d '{"model": "pirate", "messages": [{"role": "user", "content": "What is snow?"}], "max_tokens": 40}'
      python -c 'import os; from openai import OpenAI; c = OpenAI(base_url=os.environ["URL"], api_key="x"); \\
                 print(c.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "Hi"}]))'
    """
    from ..serve import EXTRA_HINT, ServeOptions, load_app, missing_extra, run

    if missing_extra():
        raise UserError(EXTRA_HINT)
    app = load_app(package, ServeOptions(api_key, max_queue, parallel, context), threads=threads)
    models = app.state.api.model_ids
    click.echo(f"serving {package} at http://{host}:{port}/v1 (models: {', '.join(models)})"
               + ("; API key required" if api_key else ""), err=True)  # fmt: skip
    run(app, host=host, port=port, log_level=log_level)
