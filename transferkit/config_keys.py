"""Every TrainConfig field from the command line (`--set key=value`) and one source of its help text: the field's
own comment in `config.py`. Values are read as YAML and checked against the field's type, so a wrong type is one
line, never a traceback deep in training."""

from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, fields
from typing import Any

import yaml

from transferkit.config import TrainConfig, checked
from transferkit.errors import UserError

FIELD_LINE = re.compile(r"^    (\w+): [^=]+=.*?(?:#\s*(.*))?$")


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs (dashes allowed in keys): `--set feature_views=1 --set head_hidden=[256]`."""
    settings: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, not '{pair}'")
        try:
            settings[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot read '{text}' as a value") from None
    return checked(settings, "--set")


def key_help() -> list[dict[str, Any]]:
    """Each field: name, type, default and its comment in config.py (empty where the name says it all)."""
    comments = {match[1]: match[2] or "" for line in inspect.getsource(TrainConfig).splitlines()
                if (match := FIELD_LINE.match(line))}
    rows = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        rows.append({"key": f.name, "type": str(f.type), "default": default, "help": comments.get(f.name, "")})
    return rows
