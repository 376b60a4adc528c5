"""`ragpt serve`: run the chat service (services/) with uvicorn from a service config file.

Mounted in ragpt.cli.main with `app.command()(serve)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ragpt.cli.common import fail, settings_from_ctx
from ragpt.errors import ConfigError, RagptError


def serve(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="Service config (TOML): departments, "
                                         "their index, API key hashes, router, batching, limits.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    degraded: Annotated[bool, typer.Option("--degraded", help="Keep serving when the config cannot work or "
                                           "the models fail to load: /readyz answers 503 and, with an API "
                                           "key, says why.")] = False,
) -> None:
    """Serve the departments' chat endpoints (OpenAI-compatible) over HTTP.

    The config is checked first (each index opens and holds its departments): a config that cannot
    work exits with an error, unless --degraded. Models then load in the background after the port
    opens; GET /readyz answers 200 once they are, and a failed load stops the server (exit status 2)
    unless --degraded.
    """
    import uvicorn

    from ragpt_service.app import create_app
    from ragpt_service.config import load_service_config
    from ragpt_service.runtime import config_problems

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:  # the loading thread: the model or index failed to load
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    try:
        cfg = load_service_config(config)
        settings = settings_from_ctx(ctx)
        problems = config_problems(cfg, settings)
        if problems and not degraded:
            raise ConfigError(f"service config {config} cannot work: {'; '.join(problems)} "
                              "(start with --degraded to serve anyway)")
        if problems:
            typer.secho(f"warning: serving degraded: {'; '.join(problems)}", fg=typer.colors.YELLOW, err=True)
        app = create_app(cfg, settings, on_load_error=None if degraded else stop)
    except RagptError as e:
        fail(e)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run()
    if failures:
        fail(RagptError(f"the service failed to load, stopped: {failures[0]} (start with --degraded to keep "
                        "serving)"))
    if not server.started:
        fail(RagptError(f"the server could not start on {host}:{port} (see the log above)"))
