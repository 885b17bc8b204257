"""Who is calling: the API key, from ``Authorization: Bearer``, ``api-key`` or ``x-api-key``.

With no keys and no master key configured the gateway runs open: every caller is the ``default``
tenant, unlimited. Otherwise a request without a known, unexpired key gets 401. A key's record is
cached in-process for a second, so a revoked virtual key stops working on every replica within a
second, and authentication rides out a Redis outage on what it has cached.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.types import Scope

from gateway.errors import AuthenticationFailed, GatewayError, ServiceUnavailable
from gateway.keys import KeyRecord, KeyStore, hash_key, static_keys
from gateway.limits import Limits
from gateway.request import header
from gateway.settings import Settings
from gateway.stores.base import StoreUnavailable

__all__ = ["Authenticator", "PermissionDenied", "Principal", "authenticate", "authenticate_scope", "require_master"]

log = logging.getLogger("gateway.auth")

_FRESH = 1.0
"""Seconds a virtual key's record is trusted without asking the store again."""
_STALE = 300.0
"""Seconds a cached record still serves while the store is unreachable."""


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    tenant: str
    models: tuple[str, ...]
    limits: Limits
    master: bool = False

    def may_use(self, model: str) -> bool:
        if self.master or "*" in self.models:  # most keys: no glob to match
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


OPEN = Principal(key_id="open", name="open", tenant="default", models=("*",), limits=Limits())


class _Known:
    """A key's record, and the principal it makes, built once rather than for every request."""

    __slots__ = ("principal", "record")

    def __init__(self, record: KeyRecord) -> None:
        self.record = record
        self.principal = Principal(
            key_id=record.id,
            name=record.name,
            tenant=record.tenant,
            models=tuple(record.models),
            limits=Limits(rpm=record.rpm, tpm=record.tpm, max_parallel=record.max_parallel),
        )


class Authenticator:
    def __init__(self, settings: Settings, store: KeyStore) -> None:
        self.store = store
        self.master_key = settings.auth.master_key
        self._static = {digest: _Known(record) for digest, record in static_keys(settings.keys).items()}
        self.open = not self._static and not self.master_key
        self._cache: dict[str, tuple[_Known | None, float]] = {}

    async def principal(self, secret: str | None) -> Principal:
        if self.open:
            return OPEN
        if not secret:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        if self.master_key and hmac.compare_digest(secret.encode(), self.master_key.encode()):
            return Principal(
                key_id="master", name="master", tenant="default", models=("*",), limits=Limits(), master=True
            )
        digest = hash_key(secret)
        known = self._static.get(digest) or await self._virtual(digest)
        if known is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if known.record.expired(time.time()):
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return known.principal

    async def _virtual(self, digest: str) -> _Known | None:
        cached = self._cache.get(digest)
        age = time.monotonic() - cached[1] if cached else None
        if cached is not None and age is not None and age < _FRESH:
            return cached[0]
        try:
            record = await self.store.by_hash(digest)
        except StoreUnavailable as exc:
            if cached is not None and age is not None and age < _STALE:
                return cached[0]
            raise ServiceUnavailable(
                f"API keys cannot be checked right now ({exc}); retry shortly.", code="auth_unavailable"
            ) from None
        if len(self._cache) > 10_000:
            self._cache.clear()  # unknown keys tried at random must not grow it forever
        known = _Known(record) if record is not None else None
        self._cache[digest] = (known, time.monotonic())
        return known

    def forget(self, digest: str) -> None:
        self._cache.pop(digest, None)


def presented_key(scope: Scope) -> str | None:
    authorization = header(scope, b"authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else authorization.strip()
    return header(scope, b"api-key") or header(scope, b"x-api-key")


async def authenticate_request(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """``before_request`` of every HTTP API route: the caller's principal and tenant go into the
    request's state. A hook rather than a guard: Litestar copies the route handler for every guard
    call, which cost as much as the rest of authentication."""
    await authenticate_scope(connection.scope, connection.app.state.auth)


async def authenticate_scope(scope: Scope, auth: Authenticator) -> None:
    """Authentication as the hot routes call it, on the ASGI scope (gateway/api.py)."""
    principal = OPEN if auth.open else await auth.principal(presented_key(scope))
    state = scope["state"]
    state["principal"] = principal
    state["tenant"] = principal.tenant


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of the WebSocket route, which has no ``before_request``."""
    await authenticate_request(connection)


async def require_master(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard of ``/admin``: the master key only."""
    auth: Authenticator = connection.app.state.auth
    if not auth.master_key:
        raise PermissionDenied("The admin API needs a master key: set [auth] master_key.")
    await authenticate(connection, handler)
    if not connection.scope["state"]["principal"].master:
        raise PermissionDenied("The admin API takes the master key only.")
