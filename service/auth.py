"""API keys: with API_KEYS or API_KEYS_FILE set, every /v1 and /v2 route needs ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. Keys are compared in constant time and never logged. Health, metrics, the page and the OpenAPI
document stay open (probes and Prometheus come from inside the cluster; /v2/health/* too, as KServe probes them).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from service.errors import Unauthorized
from service.settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/v2/health/live",
                        "/v2/health/ready"})
PROTECTED_PREFIXES = ("/v1/", "/v2")


def load_keys(settings: Settings) -> list[bytes]:
    """The configured keys. An API_KEYS_FILE that cannot be read, or holds no key (a placeholder Secret), stops the
    start: keys were asked for, and serving without them would be a silent open door."""
    keys = [key.strip() for key in settings.API_KEYS.split(",")]
    if settings.API_KEYS_FILE:
        try:
            lines = Path(settings.API_KEYS_FILE).read_text().splitlines()
        except OSError as exc:
            raise SystemExit(f"API_KEYS_FILE={settings.API_KEYS_FILE}: cannot read it ({exc.strerror}).") from exc
        from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise SystemExit(f"API_KEYS_FILE={settings.API_KEYS_FILE} holds no key: write one key per line (a "
                             "Kubernetes Secret's 'keys' entry), or unset API_KEYS_FILE to serve without keys.")
        keys += from_file
    return [key.encode() for key in keys if key]


class ApiKeys:
    def __init__(self, keys: list[bytes]):
        self.keys = keys

    def check(self, method: str, path: str, headers) -> None:
        """Raise Unauthorized unless the request is open or carries a known key."""
        if not self.keys or method == "OPTIONS" or path in OPEN_PATHS or not path.startswith(PROTECTED_PREFIXES):
            return
        from service import metrics  # not at import: the gunicorn master checks the keys before metrics exist

        offered = _offered_key(headers)
        if offered is None:
            metrics.AUTH_FAILURES.labels("missing").inc()
            raise Unauthorized("This API needs a key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")
        matched = False
        for key in self.keys:  # every key is compared, so the time taken says nothing about which one matched
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
