"""Result files of the demo and the benchmark scripts: strict JSON (no NaN / Infinity tokens)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (JSON ``null``), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    """Write ``data`` to ``path`` as strict JSON: missing measurements (NaN) become ``null``."""
    Path(path).write_text(json.dumps(_strict(data), indent=indent, allow_nan=False))
