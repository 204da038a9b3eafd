"""The whole CLI for the docs' generated command reference (docs/reference/cli.md).

`main.app` registers its commands lazily (so `--help` stays fast); a doc plugin imports a module and reads one
attribute, so this module registers them all first and exposes the typer app and its click command.
"""

from __future__ import annotations

import typer

from transferkit.cli.main import _register_commands, app

_register_commands()

command = typer.main.get_command(app)

__all__ = ["app", "command"]
