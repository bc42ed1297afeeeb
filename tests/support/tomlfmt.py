"""TOML values for the site files tests write (JSON's scalars and arrays are TOML's too)."""

from __future__ import annotations

import json


def value(v: object) -> str:
    """`v` as a TOML value; a dict becomes an inline table."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)
