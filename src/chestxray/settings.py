"""Reading params.yaml (every tunable) and config/config.yaml (paths and services)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML file into a dict; a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found -- run from the project root or pass its path")
    return yaml.safe_load(path.read_text()) or {}


def load_params(path: str | Path = "params.yaml", section: str | None = None) -> dict[str, Any]:
    """params.yaml, or one section of it (e.g. 'train')."""
    params = load_yaml(path)
    return params[section] if section else params


def load_config(path: str | Path = "config/config.yaml") -> dict[str, Any]:
    """config/config.yaml: MLflow settings and other non-tunable configuration."""
    return load_yaml(path)
