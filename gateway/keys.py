"""API keys: static ones from the config, and virtual ones an admin manages at run time.

Only a key's SHA-256 is kept; the secret is shown once, when the admin creates it. Virtual keys live in
Redis when the gateway has one (so every replica sees a revocation), else in memory. Redis keys:

    gw:apikey:{sha256}     the key's record (JSON), looked up on every authenticated request
    gw:apikey-id:{id}      the key's sha256, to find it by id
    gw:apikeys             set of ids
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, Protocol

import msgspec
from redis.exceptions import RedisError

from gateway.settings import KeySettings
from gateway.stores.base import StoreUnavailable

__all__ = ["KeyRecord", "KeyStore", "MemoryKeyStore", "RedisKeyStore", "hash_key", "new_secret", "static_keys"]


class KeyRecord(msgspec.Struct, kw_only=True):
    id: str
    name: str
    tenant: str = "default"
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    expires_at: int | None = None
    created_at: int = 0
    key_sha256: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        return {f: getattr(self, f) for f in self.__struct_fields__ if f != "key_sha256"} | {"object": "api_key"}


_decode = msgspec.json.Decoder(KeyRecord).decode
_encode = msgspec.json.encode


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return "sk-gw-" + secrets.token_urlsafe(32)


def static_keys(keys: list[KeySettings]) -> dict[str, KeyRecord]:
    """The config's keys by hash."""
    records = {}
    for key in keys:
        digest = key.key_sha256 or hash_key(key.key or "")
        records[digest] = KeyRecord(
            id=f"static-{key.name}",
            name=key.name,
            tenant=key.tenant,
            models=key.models,
            rpm=key.rpm,
            tpm=key.tpm,
            max_parallel=key.max_parallel,
            key_sha256=digest,
        )
    return records


class KeyStore(Protocol):
    async def by_hash(self, digest: str) -> KeyRecord | None: ...
    async def by_id(self, key_id: str) -> KeyRecord | None: ...
    async def all(self) -> list[KeyRecord]: ...
    async def put(self, record: KeyRecord) -> None: ...
    async def delete(self, key_id: str) -> bool: ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self._by_hash: dict[str, KeyRecord] = {}

    async def by_hash(self, digest: str) -> KeyRecord | None:
        return self._by_hash.get(digest)

    async def by_id(self, key_id: str) -> KeyRecord | None:
        return next((r for r in self._by_hash.values() if r.id == key_id), None)

    async def all(self) -> list[KeyRecord]:
        return sorted(self._by_hash.values(), key=lambda r: (r.created_at, r.id))

    async def put(self, record: KeyRecord) -> None:
        self._by_hash[record.key_sha256] = record

    async def delete(self, key_id: str) -> bool:
        record = await self.by_id(key_id)
        return record is not None and self._by_hash.pop(record.key_sha256, None) is not None


class RedisKeyStore:
    def __init__(self, redis: Any, prefix: str = "gw") -> None:
        self._redis = redis
        self._prefix = prefix

    async def by_hash(self, digest: str) -> KeyRecord | None:
        try:
            raw = await self._redis.get(f"{self._prefix}:apikey:{digest}")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        return _decode(raw) if raw is not None else None

    async def by_id(self, key_id: str) -> KeyRecord | None:
        try:
            digest = await self._redis.get(f"{self._prefix}:apikey-id:{key_id}")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        return await self.by_hash(digest.decode() if isinstance(digest, bytes) else digest) if digest else None

    async def all(self) -> list[KeyRecord]:
        try:
            ids = await self._redis.smembers(f"{self._prefix}:apikeys")
            records = [await self.by_id(i.decode() if isinstance(i, bytes) else i) for i in ids]
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        return sorted((r for r in records if r is not None), key=lambda r: (r.created_at, r.id))

    async def put(self, record: KeyRecord) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(f"{self._prefix}:apikey:{record.key_sha256}", _encode(record))
                pipe.set(f"{self._prefix}:apikey-id:{record.id}", record.key_sha256)
                pipe.sadd(f"{self._prefix}:apikeys", record.id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc

    async def delete(self, key_id: str) -> bool:
        record = await self.by_id(key_id)
        if record is None:
            return False
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self._prefix}:apikey:{record.key_sha256}")
                pipe.delete(f"{self._prefix}:apikey-id:{record.id}")
                pipe.srem(f"{self._prefix}:apikeys", record.id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
        return True


def now() -> int:
    return int(time.time())
