"""Serving configuration: the environment (and a `.env` file), with defaults, overridable per app."""
from __future__ import annotations

import os
from typing import Any

def boolean(value: object) -> bool:
    """A yes/no setting: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


# name -> (type, default). Keys are the environment variable names and the Flask config keys.
SETTINGS: dict[str, tuple[type, Any]] = {
    "CHESTXRAY_ARTIFACTS": (str, "artifacts"),
    "CHESTXRAY_MODEL_URI": (str, ""),
    "CHESTXRAY_BACKEND": (str, "auto"),  # auto | onnx | keras (see chestxray.model.network.choose_backend)
    "CHESTXRAY_TTA": (boolean, False),  # test-time augmentation: average over flip and shifts (4x the compute)
    # A test prediction and Grad-CAM when the model loads: the first request does not pay ~2 s of tracing, and a
    # model that cannot predict is reported at start (/health 503). Off: quicker starts (tests, development).
    "CHESTXRAY_WARM_UP": (boolean, True),
    "CHESTXRAY_MAX_BATCH": (int, 10),
    "CHESTXRAY_MAX_UPLOAD_MB": (float, 10.0),
    "CHESTXRAY_DRIFT_MIN_COUNT": (int, 200),  # images scored before /monitoring compares them with the reference
    "GEMINI_API_KEY": (str, ""),
    "GEMINI_MODEL": (str, "gemini-2.5-flash"),
    "GEMINI_BASE_URL": (str, ""),
    "GEMINI_TIMEOUT_S": (float, 10.0),
    # Access control (see serving/auth.py): comma-separated id:key[:role], role user|admin. Empty: open mode.
    "CHESTXRAY_API_KEYS": (str, ""),
    # Token bucket per key id (per client address in open mode); 0 requests per minute turns it off.
    "CHESTXRAY_RATE_LIMIT_PER_MIN": (float, 120.0),
    "CHESTXRAY_RATE_LIMIT_BURST": (int, 30),
    # JSON-lines audit log file; empty: the `chestxray.audit` logger (stderr).
    "CHESTXRAY_AUDIT_LOG": (str, ""),
    # production | development; Flask debug mode is refused unless development.
    "CHESTXRAY_ENV": (str, "production"),
    # Where gunicorn.conf.py binds (host:port).
    "CHESTXRAY_BIND": (str, "127.0.0.1:8000"),
}


def _convert(name: str, value: Any) -> Any:
    kind = SETTINGS[name][0]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {kind.__name__}") from None


def load_settings(overrides: dict[str, Any] | None = None, dotenv: bool = True) -> dict[str, Any]:
    """Settings from defaults < `.env` (current directory upwards) < environment < `overrides`."""
    if dotenv:
        from dotenv import find_dotenv, load_dotenv

        load_dotenv(find_dotenv(usecwd=True), override=False)
    settings = {}
    for name, (_, default) in SETTINGS.items():
        raw = os.environ.get(name, "")
        settings[name] = _convert(name, raw) if raw.strip() else default
    for name, value in (overrides or {}).items():
        settings[name] = _convert(name, value) if name in SETTINGS and value is not None else value
    return settings


def flask_debug_requested() -> bool:
    """Whether FLASK_DEBUG (Flask's own variable, read by `flask run`) asks for debug mode."""
    return os.environ.get("FLASK_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def parse_model_uri(uri: str) -> tuple[str, str]:
    """`models:/<name>@<alias>` -> (name, alias)."""
    prefix = "models:/"
    if not uri.startswith(prefix) or "@" not in uri:
        raise ValueError(
            f"CHESTXRAY_MODEL_URI={uri!r}: expected models:/<name>@<alias>, e.g. models:/chestxray@champion")
    name, alias = uri[len(prefix):].split("@", 1)
    if not name or not alias:
        raise ValueError(f"CHESTXRAY_MODEL_URI={uri!r}: expected models:/<name>@<alias>")
    return name, alias
