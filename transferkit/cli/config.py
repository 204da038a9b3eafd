"""`transferkit config`: every configuration key with its value (defaults <- recipe <- file <- --set) and help."""

from __future__ import annotations

from typing import Annotated

import typer

from transferkit.cli.main import app
from transferkit.cli.output import CONFIG, JSON, RECIPE, SETTINGS, print_json


@app.command("config")
def show_config(
    recipe: RECIPE = None,
    config: CONFIG = None,
    settings: SETTINGS = None,
    key: Annotated[str | None, typer.Option(help="Show this key only.")] = None,
    json_out: JSON = False,
) -> None:
    """The configuration `train` would use, key by key, with what each key means; set any of them with --set."""
    from transferkit.config import resolve_config, unknown_key
    from transferkit.config_keys import key_help, parse_settings

    values = resolve_config(recipe, config, **parse_settings(settings)).to_dict()
    rows = [{**row, "value": values[row["key"]]} for row in key_help() if key in (None, row["key"])]
    if key is not None and not rows:
        raise unknown_key(key, "--key")
    if json_out:
        print_json(rows)
        return
    for row in rows:
        changed = "" if row["value"] == row["default"] else f"  (default {row['default']!r})"
        print(f"{row['key']} = {row['value']!r}{changed}")
        if row["help"]:
            print(f"    {row['help']}")
