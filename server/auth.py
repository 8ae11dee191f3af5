"""Optional API-key authentication: ``Authorization: Bearer <key>`` with a key from the settings
(``ALIGND_API_KEYS``, comma-separated; empty = no authentication). Applied to every API router;
``/health`` never needs a key, ``/metrics`` only with ``ALIGND_METRICS_REQUIRE_AUTH``."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from alignd.errors import AuthenticationError

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API key of this server (ALIGND_API_KEYS); not needed when the server runs without keys.",
)


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme)
) -> None:
    keys: frozenset[str] = request.app.state.settings.api_key_set
    if not keys:
        return
    if credentials is None:
        raise AuthenticationError(
            "this server needs an API key: send the header 'Authorization: Bearer <key>' "
            "(the openai client sends its api_key that way)"
        )
    given = credentials.credentials.encode()
    # Compare against every key in constant time, so timing says nothing about which prefix matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise AuthenticationError("invalid API key: check the key you send in 'Authorization: Bearer <key>'")
