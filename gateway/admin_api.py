"""``/admin``: virtual keys and usage, for the holder of the master key.

``POST /admin/keys`` returns the secret once; afterwards only its hash exists. Deleting a key revokes
it on every replica within a second (the auth cache's freshness).
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post
from litestar.datastructures import State

from gateway.auth import require_master
from gateway.errors import InvalidRequest, NotFound
from gateway.keys import KeyRecord, hash_key, new_secret, now
from gateway.request import decode_body
from gateway.wire import encode

__all__ = ["router"]

Count = msgspec.Meta(ge=0)


class NewKey(msgspec.Struct, forbid_unknown_fields=True):
    """Unknown fields are refused: a misspelt limit must not create an unlimited key."""

    name: str
    tenant: str = "default"
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    expires_at: int | None = None


class KeyChanges(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    tenant: str | None = None
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    expires_at: int | None = None


def _json(payload: Any, status: int = 200) -> Response[bytes]:
    return Response(encode(payload), status_code=status, media_type="application/json")


def _check(values: dict[str, Any]) -> None:
    for field in ("rpm", "tpm", "max_parallel"):
        value = values.get(field)
        if value is not None and value < 0:
            raise InvalidRequest(f"`{field}` must be 0 (unlimited) or more.", param=field, code="invalid_value")
    if "name" in values and values["name"] is not None and not values["name"].strip():
        raise InvalidRequest("`name` must not be empty.", param="name", code="invalid_value")


@post("/keys", status_code=200)
async def create_key(request: Request, state: State) -> Response[bytes]:
    new = decode_body(NewKey, await request.body())
    _check(msgspec.structs.asdict(new))
    secret = new_secret()
    record = KeyRecord(
        id=f"key_{secrets.token_hex(8)}", created_at=now(), key_sha256=hash_key(secret), **msgspec.structs.asdict(new)
    )
    await state.auth.store.put(record)
    return _json(record.public() | {"key": secret})


@get("/keys")
async def list_keys(state: State) -> Response[bytes]:
    return _json({"object": "list", "data": [r.public() for r in await state.auth.store.all()]})


async def _find(request: Request, state: State) -> KeyRecord:
    key_id = request.path_params["key_id"]
    record = await state.auth.store.by_id(key_id)
    if record is None:
        raise NotFound(f"No API key with id '{key_id}'.", param="key_id")
    return record


@get("/keys/{key_id:str}")
async def retrieve_key(request: Request, state: State) -> Response[bytes]:
    return _json((await _find(request, state)).public())


@patch("/keys/{key_id:str}")
async def update_key(request: Request, state: State) -> Response[bytes]:
    record = await _find(request, state)
    changes = {
        k: v for k, v in msgspec.structs.asdict(decode_body(KeyChanges, await request.body())).items() if v is not None
    }
    _check(changes)
    updated = msgspec.structs.replace(record, **changes)
    await state.auth.store.put(updated)
    state.auth.forget(record.key_sha256)
    return _json(updated.public())


@delete("/keys/{key_id:str}", status_code=200)
async def delete_key(request: Request, state: State) -> Response[bytes]:
    record = await _find(request, state)
    await state.auth.store.delete(record.id)
    state.auth.forget(record.key_sha256)
    return _json({"object": "api_key.deleted", "id": record.id, "deleted": True})


@get("/usage")
async def usage(request: Request, state: State) -> Response[bytes]:
    rows = await state.usage.rows(
        key_id=request.query_params.get("key_id") or None, day=request.query_params.get("day") or None
    )
    return _json({"object": "list", "data": rows})


router = Router(
    path="/admin",
    route_handlers=[create_key, list_keys, retrieve_key, update_key, delete_key, usage],
    guards=[require_master],
)
