"""API keys: which paths they protect, checking them on REST and gRPC, and re-reading API_KEYS_FILE.

With API_KEYS or API_KEYS_FILE set, every /v1 and /v2 route needs ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``, and every gRPC call but health and ServerLive/ServerReady the same as metadata. Keys are
compared in constant time and never logged. Health, metrics, the page and the OpenAPI document stay open (probes and
Prometheus come from inside the cluster; /v2/health/* too, as KServe probes them).

API_KEYS_FILE is watched: at most every API_KEYS_REREAD_SECONDS a request checks the file's identity (device, inode,
size, modification time, through symlinks, so a Kubernetes Secret's ``..data`` swap is seen) and a changed file is
re-read; keys removed from it stop working then, new ones start. A changed file that cannot be read or holds no key
is logged once and the keys in force stay: a broken Secret must neither open the API nor lock every client out.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from service.errors import Unauthorized
from service.settings import Settings

log = logging.getLogger("convserve")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/v2/health/live",
                        "/v2/health/ready"})
PROTECTED_PREFIXES = ("/v1/", "/v2")


def protected(path: str) -> bool:
    """Whether a request to ``path`` (or a route template) needs an API key when keys are set."""
    return path not in OPEN_PATHS and path.startswith(PROTECTED_PREFIXES)


class KeyFileError(ValueError):
    """API_KEYS_FILE cannot be read or holds no key; the message says what to do."""


def load_keys(settings: Settings) -> list[bytes]:
    """The configured keys. An API_KEYS_FILE that cannot be read, or holds no key (a placeholder Secret), stops the
    start: keys were asked for, and serving without them would be a silent open door."""
    return _from_env(settings) + (read_key_file(settings.API_KEYS_FILE) if settings.API_KEYS_FILE else [])


def read_key_file(path: str) -> list[bytes]:
    """The keys in an API_KEYS_FILE; KeyFileError (with what to do) if it cannot be read or holds none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"API_KEYS_FILE={path}: cannot read it ({getattr(exc, 'strerror', None) or exc}).") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise KeyFileError(f"API_KEYS_FILE={path} holds no key: write one key per line (a Kubernetes Secret's 'keys' "
                         "entry), or unset API_KEYS_FILE to serve without keys.")
    return [key.encode() for key in keys]


def _from_env(settings: Settings) -> list[bytes]:
    return [key.strip().encode() for key in settings.API_KEYS.split(",") if key.strip()]


def _identity(path: str) -> tuple | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


class ApiKeys:
    """The keys in force. Made with ``watching`` (the settings), API_KEYS_FILE is re-read when it changes."""

    def __init__(self, keys: list[bytes], watching: Settings | None = None):
        self.keys = keys
        self._static = _from_env(watching) if watching is not None else []
        self._path = watching.API_KEYS_FILE if watching is not None else ""
        self._every = watching.API_KEYS_REREAD_SECONDS if watching is not None else 0.0
        self._identity = _identity(self._path) if self._path else None
        self._checked = time.monotonic()

    def current(self) -> list[bytes]:
        if self._path and time.monotonic() - self._checked >= self._every:
            self._checked = time.monotonic()
            identity = _identity(self._path)
            if identity != self._identity:
                self._identity = identity
                self._reread()
        return self.keys

    def _reread(self) -> None:
        from service import metrics

        try:
            keys = self._static + read_key_file(self._path)
        except KeyFileError as exc:
            metrics.API_KEY_RELOADS.labels("failed").inc()
            log.error("%s; the %d keys read before stay in force until it holds keys again", exc,
                      len(self.keys))
            return
        metrics.API_KEY_RELOADS.labels("ok").inc()
        if keys != self.keys:
            log.info("API keys re-read from %s: %d in force (%d before)", self._path, len(keys), len(self.keys))
        self.keys = keys

    def check(self, method: str, path: str, headers) -> None:
        """Raise Unauthorized unless the request is open or carries a known key."""
        if method == "OPTIONS" or not protected(path):
            return
        self.require(headers)

    def require(self, headers) -> None:
        """Raise Unauthorized unless ``headers`` (anything with a case-insensitive ``get``: HTTP headers, gRPC
        metadata) carry a known key, when keys are configured."""
        keys = self.current()
        if not keys:
            return
        from service import metrics  # not at import: the gunicorn master checks the keys before metrics exist

        offered = _offered_key(headers)
        if offered is None:
            metrics.AUTH_FAILURES.labels("missing").inc()
            raise Unauthorized("This API needs a key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")
        matched = False
        for key in keys:  # every key is compared, so the time taken says nothing about which one matched
            matched |= hmac.compare_digest(offered, key)
        if not matched:
            metrics.AUTH_FAILURES.labels("invalid").inc()
            raise Unauthorized("The API key is not valid. Check it, or ask for a new one.")


def _offered_key(headers) -> bytes | None:
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip().encode("utf-8", "replace")
    api_key = headers.get("X-API-Key", "").strip()
    return api_key.encode("utf-8", "replace") if api_key else None
