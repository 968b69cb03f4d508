"""Benchmarks that compare tpfleet with its peers in the same run (`tpfleet bench ...`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def report(result: dict, out_dir: str, name: str, format_result: Callable[[dict], str]) -> dict:
    """Write `result` as `out_dir/name.json`, print its table, and return it with the JSON's path."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(format_result(result), flush=True)
    result["json"] = str(path)
    return result
