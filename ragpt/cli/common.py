"""Helpers shared by the CLI's command groups."""

from __future__ import annotations

import typer


def settings_from_ctx(ctx: typer.Context, **more):
    """Settings from the global flags stored on the context plus this command's flags."""
    from ragpt.config import load_settings

    root = ctx.find_root()
    given = dict(root.obj or {})
    given.update({k: v for k, v in more.items() if v is not None})
    return load_settings(**given)


def fail(e: Exception) -> None:
    """Print a clear one-line error and exit with status 2 (bad input), without a traceback."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
