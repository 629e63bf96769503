"""Writing JSON files (plans, laws, manifests): parent folders created, indented."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike, data: Any) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    return path
