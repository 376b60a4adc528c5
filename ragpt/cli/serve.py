"""`ragpt serve`: run the chat service (services/) with uvicorn from a service config file.

Mounted in ragpt.cli.main with `app.command()(serve)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ragpt.cli.common import fail, settings_from_ctx
from ragpt.errors import RagptError


def serve(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="Service config (TOML): departments, "
                                         "their index, API key hashes, router, batching, limits.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the departments' chat endpoints (OpenAI-compatible) over HTTP.

    Models load in the background after the port opens; GET /readyz answers 200 once they are.
    """
    import uvicorn

    from ragpt_service.app import create_app
    from ragpt_service.config import load_service_config

    try:
        app = create_app(load_service_config(config), settings_from_ctx(ctx))
    except RagptError as e:
        fail(e)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
