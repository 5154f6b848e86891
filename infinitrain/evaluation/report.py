"""The JSON every evaluation command writes: its results and everything needed to redo them."""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..inference import LoadedModel


def _finite(value: Any) -> Any:
    """NaN/inf become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _described(loaded: LoadedModel) -> dict[str, Any]:
    weight = loaded.model.embed_tokens.weight
    return {"path": str(loaded.path), "config": loaded.model.config.to_dict(),
            "dtype": str(weight.dtype).removeprefix("torch."), "device": str(weight.device)}


def write_json(path: str | Path, command: str, loaded: LoadedModel | list[LoadedModel] | None,
               settings: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write ``results`` with the command, its settings, the model (None for commands that read
    no model, such as ``inspect training``; a list for one that compares several) and the software
    that ran it."""
    if isinstance(loaded, list):
        model = [_described(one) for one in loaded]
        model = model[0] if len(model) == 1 else model
    else:
        model = None if loaded is None else _described(loaded)
    payload = {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "settings": settings,
        "results": results,
        "software": {"infinitrain": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=2) + "\n")
    return path
