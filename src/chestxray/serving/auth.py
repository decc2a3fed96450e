"""API keys and roles: who may call what.

CHESTXRAY_API_KEYS is a comma-separated list of ``id:key[:role]`` (role ``user`` or ``admin``,
default ``user``); e.g. ``radiology:9f2c...:user,ops:51ab...:admin``. Clients send the key in the
``X-API-Key`` header. Only SHA-256 digests of the keys are kept, compared in constant time with
`hmac.compare_digest` against every configured key (no early exit that would time which matched).
The key id -- never the key -- is what the audit log and the rate limiter see.

No keys configured means open mode: every user endpoint answers without a key (start-up logs a
warning), and admin endpoints are refused, since there is no admin to let in.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app, g, request

from chestxray.serving import ratelimit
from chestxray.serving.errors import ApiError

log = logging.getLogger(__name__)

HEADER = "X-API-Key"
ROLES = ("user", "admin")  # an admin may also do what a user may
MIN_KEY_LENGTH = 16  # shorter keys are guessable; refuse them at start-up
EXTENSION = "chestxray.keys"


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes  # sha256 of the key
    role: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(spec: str) -> tuple[ApiKey, ...]:
    """Parse CHESTXRAY_API_KEYS; ValueError in words for a malformed entry (never echoing the key)."""
    keys: list[ApiKey] = []
    for number, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ValueError(f"CHESTXRAY_API_KEYS entry {number}: expected id:key or id:key:role")
        key_id, key, role = parts[0], parts[1], parts[2] if len(parts) == 3 else "user"
        if role not in ROLES:
            raise ValueError(f"CHESTXRAY_API_KEYS entry {number} ({key_id}): role must be one of {', '.join(ROLES)}")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"CHESTXRAY_API_KEYS entry {number} ({key_id}): the key is shorter than "
                             f"{MIN_KEY_LENGTH} characters (make one with: python -c \"import secrets; "
                             f"print(secrets.token_urlsafe(32))\")")
        if any(k.key_id == key_id for k in keys):
            raise ValueError(f"CHESTXRAY_API_KEYS: the id {key_id!r} is used twice")
        keys.append(ApiKey(key_id, _digest(key), role))
    return tuple(keys)


def install(app, spec: str) -> None:
    """Parse the keys into the app (digests only) and say at start-up whether the API is open."""
    keys = parse_keys(spec)
    app.extensions[EXTENSION] = keys
    if keys:
        log.info("API keys required (header %s): %d key(s), ids %s", HEADER, len(keys),
                 ", ".join(f"{k.key_id} ({k.role})" for k in keys))
    else:
        log.warning("OPEN MODE: no API keys configured (CHESTXRAY_API_KEYS is empty) -- anyone who can reach "
                    "this server can use the prediction endpoints; admin endpoints are disabled")


def keys_required() -> bool:
    """Whether this app has API keys configured (False: open mode)."""
    return bool(current_app.extensions[EXTENSION])


def _match(presented: str) -> ApiKey | None:
    """The configured key whose digest equals the presented key's, comparing against all of them."""
    digest = _digest(presented)
    found = None
    for key in current_app.extensions[EXTENSION]:
        if hmac.compare_digest(key.digest, digest):
            found = key
    return found


def authorize(role: str) -> None:
    """Let this request through for `role`, charge its rate limit, or raise 401/403/429 as ApiError."""
    keys = current_app.extensions[EXTENSION]
    g.key_id = None
    if not keys:
        if role == "admin":
            raise ApiError(403, "forbidden", "admin endpoints need an admin API key; configure one in "
                                             "CHESTXRAY_API_KEYS (id:key:admin)")
        ratelimit.charge(f"addr:{request.remote_addr}")
        return
    presented = request.headers.get(HEADER, "")
    if not presented:
        raise ApiError(401, "missing_api_key", f"send your API key in the {HEADER} header")
    key = _match(presented)
    if key is None:
        ratelimit.charge(f"addr:{request.remote_addr}")  # guessing keys costs tokens too
        raise ApiError(401, "invalid_api_key", f"the {HEADER} header does not hold a valid API key")
    g.key_id = key.key_id
    ratelimit.charge(f"key:{key.key_id}")
    if role == "admin" and key.role != "admin":
        raise ApiError(403, "forbidden", f"this endpoint needs an admin key; key {key.key_id!r} has role {key.role!r}")


def requires_role(role: str = "user") -> Callable:
    """View decorator: the request needs a valid X-API-Key with `role` (user or admin), within its rate limit."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            authorize(role)
            return view(*args, **kwargs)

        guarded.required_role = role  # type: ignore[attr-defined]  (read by the OpenAPI test)
        return guarded

    return decorate
