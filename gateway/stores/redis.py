"""History in Redis, shared by every gateway process.

Keys, for prefix ``p``, tenant ``t`` and user ``u`` (tenants, users and ids are percent-escaped, so a
``:`` in one cannot make two keys collide; the braces are literal: the tenant is the key's Redis
Cluster hash tag, so one tenant's keys share a slot and each script's keys with them)::

    p:{t}:seq                   counter giving records their ``seq``
    p:{t}:cmpl:<id>             completion record, JSON
    p:{t}:cmpls                 sorted set: the tenant's completions
    p:{t}:u:<u>:cmpls           sorted set: one user's completions
    p:{t}:conv:<id>             conversation record, JSON
    p:{t}:conv:<id>:items       list of item JSON, oldest first, capped to the newest ``max_items``
    p:{t}:convs                 sorted set: the tenant's conversations
    p:{t}:u:<u>:convs           sorted set: one user's conversations
    p:{t}:default               id of the default conversation of the tenant-wide scope
    p:{t}:u:<u>:default         id of a user's default conversation

An index member is ``<seq, 16 hex digits>:<id>``, scored by the record's ``created``. Redis orders
equal scores by member, so an index is in creation order, ties by insertion, as base.py specifies.
A member also says which write of a record it was added for: a member whose record has expired, or
whose record's ``seq`` differs, is skipped on read and removed then.

Every write sets the TTL on each key it touches (a record, its items, its index keys), so an index
outlives the records it lists. When the ``seq`` counter expires it starts again at 1; no record then
is younger than the TTL, so none ties on ``created`` with the records numbered after the reset.

Atomic steps are Lua scripts: ``save()`` writes the completion, its index entries and the turn's items
in one script, which drops the items when the conversation is gone. Reads that check who owns a record
before writing rely on owners never changing; the write itself checks the record still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from gateway.scripts import Call, run_scripts, send_commands
from gateway.stores.base import (
    CompletionRecord,
    ConversationRecord,
    Exchange,
    ExchangesRefused,
    Item,
    Order,
    Scope,
    StoreUnavailable,
)

__all__ = ["RedisStore"]

_R = TypeVar("_R", CompletionRecord, ConversationRecord)

_completion = msgspec.json.Decoder(CompletionRecord)
_conversation = msgspec.json.Decoder(ConversationRecord)
_item = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.encode

# Tenants and users whose key names are kept, escaped; past it, the names start again.
_NAMES_KEPT = 10_000
# A filtered listing reads the index this many entries at a time until the page is full.
_SCAN_BATCH = 100
# default_conversation retries when another call moved the pointer first; two rounds settle it.
_DEFAULT_ATTEMPTS = 10

# Shared by the scripts: PEXPIRE when the store has a TTL (ARGV[1], in milliseconds, 0 for none).
_TOUCH = """
local ttl = tonumber(ARGV[1])
local function touch(key)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
local function push(key, values, first)
  -- In slices: unpack() of thousands of values overflows Lua's C stack.
  for i = first, #values, 500 do
    redis.call('RPUSH', key, unpack(values, i, math.min(i + 499, #values)))
  end
end
"""

_SAVE = (
    _TOUCH
    + """
-- KEYS: every key the batch writes, once each (one tenant's keys, which share a slot).
-- ARGV: ttl, max_items, then one exchange each: a line of numbers, then its values back to back.
--   The numbers: the indexes in KEYS of its completion, completions, user completions (0 0 0 without
--   a completion) and of its conversation, items, conversations, user conversations (0 0 0 0 without
--   items); the completion's score; the lengths in bytes of its member, of its completion JSON and
--   of each item JSON. Lengths rather than separators: the values are any text.
-- Returns one {completion written, items written} per exchange, or its error: pcall keeps one
-- exchange's error from stopping the exchanges after it.
local function save(packed)
  local eol = string.find(packed, '\\n', 1, true)
  local head = {}
  for word in string.gmatch(string.sub(packed, 1, eol - 1), '%S+') do head[#head + 1] = tonumber(word) end
  local values, at = {}, eol + 1
  for i = 9, #head do
    values[#values + 1] = string.sub(packed, at, at + head[i] - 1)
    at = at + head[i]
  end
  local wrote = 0
  if head[1] > 0 then
    if redis.call('EXISTS', KEYS[head[1]]) == 1 then
      -- A retried write whose first attempt landed, items and all.
      return {0, 0}
    end
    redis.call('SET', KEYS[head[1]], values[2])
    redis.call('ZADD', KEYS[head[2]], head[8], values[1])
    redis.call('ZADD', KEYS[head[3]], head[8], values[1])
    for i = 1, 3 do touch(KEYS[head[i]]) end
    wrote = 1
  end
  if head[4] == 0 or redis.call('EXISTS', KEYS[head[4]]) == 0 then
    return {wrote, 0}
  end
  push(KEYS[head[5]], values, 3)
  redis.call('LTRIM', KEYS[head[5]], -tonumber(ARGV[2]), -1)
  for i = 4, 7 do touch(KEYS[head[i]]) end
  return {wrote, 1}
end
local out = {}
for i = 3, #ARGV do
  local ok, result = pcall(save, ARGV[i])
  if ok then
    out[#out + 1] = result
  else
    out[#out + 1] = {err = type(result) == 'table' and result.err or tostring(result)}
  end
end
return out
"""
)

_CREATE = (
    _TOUCH
    + """
-- KEYS: conversation, items, conversations, user conversations[, default pointer]
-- ARGV: ttl, max_items, id, record JSON, member, score, pointer value expected, item JSON...
-- Returns {1, JSON} once created, {2, JSON} when the id exists already (a retried create, kept as it
-- is), or {0, pointer} when the pointer no longer holds the expected value.
if KEYS[5] then
  local current = redis.call('GET', KEYS[5]) or ''
  if current ~= ARGV[7] then return {0, current} end
end
local status, record = 1, ARGV[4]
local existing = redis.call('GET', KEYS[1])
if existing then
  status, record = 2, existing
else
  redis.call('SET', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  if #ARGV >= 8 then
    push(KEYS[2], ARGV, 8)
    redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
  end
  for i = 1, 4 do touch(KEYS[i]) end
end
if KEYS[5] then
  redis.call('SET', KEYS[5], ARGV[3])
  touch(KEYS[5])
end
return {status, record}
"""
)

_REMOVE_ITEM = (
    _TOUCH
    + """
-- KEYS: conversation, items, conversations, user conversations.  ARGV: ttl, item JSON.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local removed = redis.call('LREM', KEYS[2], 1, ARGV[2])
if removed > 0 then
  for i = 1, 4 do touch(KEYS[i]) end
end
return removed
"""
)

_PAGE = """
-- KEYS: index.  ARGV: member to start after ('' from the start), its score, count, '1' for descending.
-- The member may have left the index since the caller read it (deleted, or removed as stale while a
-- listing walks its batches): added back for the length of the script, its rank says where it was.
local key, member = KEYS[1], ARGV[1]
local rank_of = ARGV[4] == '1' and 'ZREVRANK' or 'ZRANK'
local start = 0
if member ~= '' then
  local rank = redis.call(rank_of, key, member)
  if rank then
    start = rank + 1
  else
    redis.call('ZADD', key, ARGV[2], member)
    start = redis.call(rank_of, key, member)
    redis.call('ZREM', key, member)
  end
end
local stop = start + tonumber(ARGV[3]) - 1
if ARGV[4] == '1' then
  return redis.call('ZREVRANGE', key, start, stop, 'WITHSCORES')
end
return redis.call('ZRANGE', key, start, stop, 'WITHSCORES')
"""


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """redis-py's exceptions end here, so callers only ever see StoreUnavailable (httpx's
    ``map_httpcore_exceptions`` pattern). OSError covers the builtin ConnectionError and TimeoutError
    that asyncio's streams raise underneath redis-py."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"redis: {str(exc) or type(exc).__name__}") from exc


def _escape(value: str) -> str:
    # Most names (generated ids, plain user names) need no escaping, and the check costs a third
    # of quote()'s call for every key named.
    return value if _PLAIN(value) else quote(value, safe="")


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _text(value: bytes | str) -> str:
    # The client we are handed may or may not decode responses.
    return value.decode() if isinstance(value, bytes) else value


def _member(seq: int, record_id: str) -> str:
    return f"{seq:016x}:{record_id}"


class _Keys:
    """One tenant's key names (the scheme in the module docstring)."""

    def __init__(self, prefix: str, tenant: str) -> None:
        self._base = f"{prefix}:{{{_escape(tenant)}}}"
        self._owners: dict[str, str] = {}
        """Each user's part of the names, escaped once: every exchange names its user's indexes."""
        self._completions: dict[str | None, str] = {}

    def _owner(self, user: str | None) -> str:
        if user is None:
            return self._base
        owner = self._owners.get(user)
        if owner is None:
            if len(self._owners) > _NAMES_KEPT:
                self._owners.clear()
            owner = self._owners[user] = f"{self._base}:u:{_escape(user)}"
        return owner

    @property
    def seq(self) -> str:
        return f"{self._base}:seq"

    def completion(self, completion_id: str) -> str:
        return f"{self._base}:cmpl:{_escape(completion_id)}"

    def completions(self, user: str | None = None) -> str:
        # Named once per user: every recorded completion adds to two of these indexes.
        name = self._completions.get(user)
        if name is None:
            if len(self._completions) > _NAMES_KEPT:
                self._completions.clear()
            name = self._completions[user] = f"{self._owner(user)}:cmpls"
        return name

    def conversation(self, conversation_id: str) -> str:
        return f"{self._base}:conv:{_escape(conversation_id)}"

    def items(self, conversation_id: str) -> str:
        return f"{self.conversation(conversation_id)}:items"

    def conversations(self, user: str | None = None) -> str:
        return f"{self._owner(user)}:convs"

    def default(self, user: str | None) -> str:
        return f"{self._owner(user)}:default"

    def conversation_keys(self, record: ConversationRecord) -> list[str]:
        """What a write to a conversation touches, in the order the scripts take them."""
        return [
            self.conversation(record.id),
            self.items(record.id),
            self.conversations(),
            self.conversations(record.user),
        ]


class _SaveBatch:
    """One tenant's exchanges as one call of the save script: its keys, each once, and one packed
    argument an exchange (the layout is in the script's comments)."""

    def __init__(self, keys: _Keys, args: list[Any]) -> None:
        self._names = keys
        self._index: dict[str, int] = {}
        self.keys: list[str] = []
        self.args = args
        self.exchanges: list[int] = []
        """Where the exchanges added sit in the caller's batch."""

    def _key(self, name: str) -> int:
        index = self._index.get(name)
        if index is None:
            self.keys.append(name)
            index = self._index[name] = len(self.keys)
        return index

    def add(self, record: CompletionRecord | None, conversation: ConversationRecord | None, items: list[bytes]) -> None:
        """An exchange: its completion, and its items (JSON) when its conversation exists."""
        # The head is formatted as bytes in one step: formatting its numbers is most of the cost.
        names, key = self._names, self._key
        if record is not None:
            c, cs, ucs = key(names.completion(record.id)), key(names.completions()), key(names.completions(record.user))
            score = record.created
            member, data = b"%016x:%s" % (record.seq, record.id.encode()), _encode(record)  # as _member() writes it
        else:
            c = cs = ucs = score = 0
            member = data = b""
        if conversation is not None and items:
            v, vi, vs, uvs = map(key, names.conversation_keys(conversation))
            lengths = [b" %d" % len(item) for item in items]
            head = b"%d %d %d %d %d %d %d %d %d %d" % (c, cs, ucs, v, vi, vs, uvs, score, len(member), len(data))
            self.args.append(b"".join([head, *lengths, b"\n", member, data, *items]))
        else:
            head = b"%d %d %d 0 0 0 0 %d %d %d\n" % (c, cs, ucs, score, len(member), len(data))
            self.args.append(b"".join([head, member, data]))


def _matches(record: CompletionRecord, model: str | None, metadata: dict[str, str] | None) -> bool:
    if model is not None and record.model != model:
        return False
    return not metadata or all(record.metadata.get(key) == value for key, value in metadata.items())


def _page_items(items: list[Item], after: str | None, limit: int, order: Order) -> tuple[list[Item], bool]:
    """Items are paged here rather than in Redis: a list holds at most ``max_items``, and an item's id
    is inside its JSON."""
    _check_limit(limit)
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        position = next((i for i, item in enumerate(ordered) if item.get("id") == after), None)
        if position is None:
            return [], False
        start = position + 1
    page = ordered[start : start + limit + 1]
    return page[:limit], len(page) > limit


class RedisStore:
    def __init__(
        self, redis: Redis, *, ttl_seconds: float | None = None, max_items: int = 1000, prefix: str = "gw"
    ) -> None:
        self._redis = redis
        self._ttl_ms = max(1, round(ttl_seconds * 1000)) if ttl_seconds is not None else 0
        self._max_items = max_items
        self._prefix = prefix
        self._save = redis.register_script(_SAVE)
        self._create = redis.register_script(_CREATE)
        self._remove_item = redis.register_script(_REMOVE_ITEM)
        self._page = redis.register_script(_PAGE)
        # The history writer's batches go out on one connection, taken from the pool once: a
        # redis-py pipeline costs as much CPU as the round trip itself (see gateway/scripts.py).
        self._writing = asyncio.Lock()
        self._connection: Any = None
        self._tenants: dict[str, _Keys] = {}

    def _keys(self, tenant: str) -> _Keys:
        keys = self._tenants.get(tenant)
        if keys is None:
            if len(self._tenants) > _NAMES_KEPT:
                self._tenants.clear()
            keys = self._tenants[tenant] = _Keys(self._prefix, tenant)
        return keys

    async def ping(self) -> None:
        with _unavailable():
            await self._redis.ping()

    async def save(self, exchange: Exchange) -> None:
        await self.save_many([exchange])

    async def save_many(self, exchanges: list[Exchange]) -> None:
        refused: dict[int, Exception] = {}
        with _unavailable():
            async with self._writing:
                if self._connection is None:
                    self._connection = await self._redis.connection_pool.get_connection()
                refused = await self._save_on(self._connection, exchanges)
        # Outside _unavailable: a refusal is not an outage, and retrying will not help.
        if refused:
            raise ExchangesRefused(refused)

    async def _save_on(self, connection: Any, exchanges: list[Exchange]) -> dict[int, Exception]:
        """The exchanges each refused, by position; the rest are written."""
        # One round trip for what each script needs to know first: the seqs, one INCRBY per tenant
        # for the whole batch, and who owns each conversation (its user index is among the keys the
        # script refreshes) ...
        tenants: dict[str, list[int]] = {}
        conversation_at: dict[int, int] = {}
        commands: list[tuple[Any, ...]] = []
        for n, exchange in enumerate(exchanges):
            if exchange.completion is not None:
                tenants.setdefault(exchange.completion.tenant, []).append(n)
            if exchange.conversation is not None and exchange.items:
                conversation_at[n] = len(commands)
                commands.append(("GET", self._keys(self._tenant(exchange)).conversation(exchange.conversation)))
        seq_at: dict[str, int] = {}
        for tenant, members in tenants.items():
            seq_at[tenant] = len(commands)
            seq_key = self._keys(tenant).seq
            commands.append(("INCRBY", seq_key, len(members)))
            if self._ttl_ms:
                commands.append(("PEXPIRE", seq_key, self._ttl_ms))
        replies = await send_commands(connection, commands) if commands else []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        seqs: dict[int, int] = {}
        for tenant, members in tenants.items():
            last = replies[seq_at[tenant]]
            for seq, n in enumerate(members, start=last - len(members) + 1):
                seqs[n] = seq
        # ... and one for the writes: a script call per tenant, each exchange still atomic.
        batches: dict[str, _SaveBatch] = {}
        for n, exchange in enumerate(exchanges):
            tenant = self._tenant(exchange)
            batch = batches.get(tenant)
            if batch is None:
                batch = batches[tenant] = _SaveBatch(self._keys(tenant), [self._ttl_ms, self._max_items])
            batch.exchanges.append(n)
            completion = exchange.completion
            if completion is not None:
                # The store's to set (see CompletionRecord.seq); a retried write sets it again.
                completion.seq = seqs[n]
            conversation = None
            if exchange.items:
                at = conversation_at.get(n)
                if at is not None and replies[at] is not None:
                    conversation = _conversation.decode(replies[at])
                batch.add(completion, conversation, [_encode(item) for item in exchange.items])
            else:
                batch.add(completion, None, [])
        calls: list[Call] = [(self._save, batch.keys, batch.args) for batch in batches.values()]
        refused: dict[int, Exception] = {}
        for batch, result in zip(batches.values(), await run_scripts(self._redis, calls, connection), strict=True):
            if isinstance(result, Exception):
                raise result
            outcomes = zip(batch.exchanges, result, strict=True)
            refused.update((n, outcome) for n, outcome in outcomes if isinstance(outcome, Exception))
        return refused

    @staticmethod
    def _tenant(exchange: Exchange) -> str:
        completion = exchange.completion
        return exchange.tenant or (completion.tenant if completion is not None else "")

    # Stored completions ---------------------------------------------------------------------------

    async def get_completion(self, scope: Scope, completion_id: str) -> CompletionRecord | None:
        with _unavailable():
            raw = await self._redis.get(self._keys(scope.tenant).completion(completion_id))
        return _visible(scope, _completion.decode(raw)) if raw is not None else None

    async def list_completions(
        self,
        scope: Scope,
        *,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Order = "asc",
    ) -> tuple[list[CompletionRecord], bool]:
        keys = self._keys(scope.tenant)
        start = None
        if after is not None:
            start = await self.get_completion(scope, after)
            if start is None:
                return [], False
        filtered = model is not None or bool(metadata)
        with _unavailable():
            return await self._scan(
                scope,
                keys.completions(scope.user),
                keys.completion,
                _completion.decode,
                start,
                limit=limit,
                order=order,
                match=(lambda r: _matches(r, model, metadata)) if filtered else None,
            )

    async def update_completion(
        self, scope: Scope, completion_id: str, metadata: dict[str, str]
    ) -> CompletionRecord | None:
        record = await self.get_completion(scope, completion_id)
        if record is None:
            return None
        record = msgspec.structs.replace(record, metadata=dict(metadata))
        keys = self._keys(scope.tenant)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                # XX: a record deleted since we read it stays deleted.
                self._set_existing(pipe, keys.completion(record.id), _encode(record))
                self._expire(pipe, keys.completions(), keys.completions(record.user))
                written, *_ = await pipe.execute()
        return record if written else None

    async def delete_completion(self, scope: Scope, completion_id: str) -> bool:
        record = await self.get_completion(scope, completion_id)
        if record is None:
            return False
        keys = self._keys(scope.tenant)
        member = _member(record.seq, record.id)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.completion(record.id))
                pipe.zrem(keys.completions(), member)
                pipe.zrem(keys.completions(record.user), member)
                deleted, *_ = await pipe.execute()
        return bool(deleted)

    # Conversations --------------------------------------------------------------------------------

    async def create_conversation(self, record: ConversationRecord, items: list[Item]) -> ConversationRecord:
        with _unavailable():
            created = await self._create_conversation(record, items)
        assert created is not None  # only a pointer can refuse
        return created

    async def get_conversation(self, scope: Scope, conversation_id: str) -> ConversationRecord | None:
        with _unavailable():
            raw = await self._redis.get(self._keys(scope.tenant).conversation(conversation_id))
        return _visible(scope, _conversation.decode(raw)) if raw is not None else None

    async def update_conversation(
        self, scope: Scope, conversation_id: str, metadata: dict[str, str]
    ) -> ConversationRecord | None:
        record = await self.get_conversation(scope, conversation_id)
        if record is None:
            return None
        record = msgspec.structs.replace(record, metadata=dict(metadata))
        keys = self._keys(scope.tenant)
        conversation, *others = keys.conversation_keys(record)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                self._set_existing(pipe, conversation, _encode(record))
                self._expire(pipe, *others)
                written, *_ = await pipe.execute()
        return record if written else None

    async def delete_conversation(self, scope: Scope, conversation_id: str) -> bool:
        record = await self.get_conversation(scope, conversation_id)
        if record is None:
            return False
        keys = self._keys(scope.tenant)
        member = _member(record.seq, record.id)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.conversation(record.id))
                pipe.delete(keys.items(record.id))
                pipe.zrem(keys.conversations(), member)
                pipe.zrem(keys.conversations(record.user), member)
                deleted, *_ = await pipe.execute()
        return bool(deleted)

    async def list_conversations(
        self, scope: Scope, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[ConversationRecord], bool]:
        keys = self._keys(scope.tenant)
        start = None
        if after is not None:
            start = await self.get_conversation(scope, after)
            if start is None:
                return [], False
        with _unavailable():
            return await self._scan(
                scope,
                keys.conversations(scope.user),
                keys.conversation,
                _conversation.decode,
                start,
                limit=limit,
                order=order,
                match=None,
            )

    async def add_items(self, scope: Scope, conversation_id: str, items: list[Item]) -> list[Item] | None:
        record = await self.get_conversation(scope, conversation_id)
        if record is None:
            return None
        encoded = [_encode(item) for item in items]
        if encoded:
            batch = _SaveBatch(self._keys(scope.tenant), [self._ttl_ms, self._max_items])
            batch.add(None, record, encoded)
            with _unavailable():
                [outcome] = await self._save(keys=batch.keys, args=batch.args)
            if isinstance(outcome, Exception):
                raise outcome
            _, appended = outcome
            if not appended:
                return None  # deleted since we read it
        return [_item.decode(raw) for raw in encoded]

    async def list_items(
        self, scope: Scope, conversation_id: str, *, after: str | None = None, limit: int = 20, order: Order = "desc"
    ) -> tuple[list[Item], bool] | None:
        loaded = await self._load_items(scope, conversation_id)
        if loaded is None:
            return None
        return _page_items([_item.decode(raw) for raw in loaded[1]], after, limit, order)

    async def get_item(self, scope: Scope, conversation_id: str, item_id: str) -> Item | None:
        loaded = await self._load_items(scope, conversation_id)
        if loaded is None:
            return None
        return next((item for item in map(_item.decode, loaded[1]) if item.get("id") == item_id), None)

    async def delete_item(self, scope: Scope, conversation_id: str, item_id: str) -> ConversationRecord | None:
        loaded = await self._load_items(scope, conversation_id)
        if loaded is None:
            return None
        record, raws = loaded
        raw = next((raw for raw in raws if _item.decode(raw).get("id") == item_id), None)
        if raw is None:
            return None
        keys = self._keys(scope.tenant).conversation_keys(record)
        with _unavailable():
            # LREM of the exact stored element: item ids are unique in a conversation, so this is the one.
            removed = await self._remove_item(keys=keys, args=[self._ttl_ms, raw])
        return record if removed else None

    async def items(self, scope: Scope, conversation_id: str) -> list[Item] | None:
        loaded = await self._load_items(scope, conversation_id)
        return [_item.decode(raw) for raw in loaded[1]] if loaded is not None else None

    async def default_conversation(self, scope: Scope, new: ConversationRecord) -> ConversationRecord:
        if not scope.sees(new.tenant, new.user):
            raise ValueError(f"conversation of {new.tenant}/{new.user} cannot be the default of {scope}")
        keys = self._keys(scope.tenant)
        pointer = keys.default(scope.user)
        with _unavailable():
            for _ in range(_DEFAULT_ATTEMPTS):
                current = await self._redis.get(pointer)
                if current is not None:
                    async with self._redis.pipeline(transaction=True) as pipe:
                        pipe.get(keys.conversation(_text(current)))
                        self._expire(pipe, pointer)
                        raw, *_ = await pipe.execute()
                    record = _visible(scope, _conversation.decode(raw)) if raw is not None else None
                    if record is not None:
                        return record
                # None yet, or it points at a conversation that is gone: replace it, unless another
                # call did first (compare-and-set in the script), then read again.
                expected = _text(current) if current is not None else ""
                created = await self._create_conversation(new, [], pointer=pointer, expected=expected)
                if created is not None:
                    return created
        raise StoreUnavailable(f"the default conversation of {scope} kept changing")

    # Internals ------------------------------------------------------------------------------------

    def _next_seq(self, pipe: Pipeline, keys: _Keys, count: int = 1) -> None:
        """Queue taking ``count`` seqs: the reply is the last of them."""
        pipe.incrby(keys.seq, count)
        self._expire(pipe, keys.seq)

    def _expire(self, pipe: Pipeline, *keys: str) -> None:
        if self._ttl_ms:
            for key in keys:
                pipe.pexpire(key, self._ttl_ms)

    def _set_existing(self, pipe: Pipeline, key: str, value: bytes) -> None:
        if self._ttl_ms:
            pipe.set(key, value, xx=True, px=self._ttl_ms)
        else:
            pipe.set(key, value, xx=True, keepttl=True)

    async def _create_conversation(
        self, record: ConversationRecord, items: list[Item], *, pointer: str | None = None, expected: str = ""
    ) -> ConversationRecord | None:
        """Run the create script; None when ``pointer`` did not hold ``expected``."""
        keys = self._keys(record.tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
            self._next_seq(pipe, keys)
            seq, *_ = await pipe.execute()
        record = msgspec.structs.replace(record, seq=seq)
        script_keys = keys.conversation_keys(record) + ([pointer] if pointer is not None else [])
        args = [self._ttl_ms, self._max_items, record.id, _encode(record), _member(seq, record.id), record.created_at]
        args += [expected, *(_encode(item) for item in items)]
        status, raw = await self._create(keys=script_keys, args=args)
        return _conversation.decode(raw) if status else None

    async def _load_items(self, scope: Scope, conversation_id: str) -> tuple[ConversationRecord, list[bytes]] | None:
        keys = self._keys(scope.tenant)
        with _unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(keys.conversation(conversation_id))
                pipe.lrange(keys.items(conversation_id), 0, -1)
                raw, items = await pipe.execute()
        record = _visible(scope, _conversation.decode(raw)) if raw is not None else None
        return (record, items) if record is not None else None

    async def _scan(
        self,
        scope: Scope,
        index: str,
        key_of: Callable[[str], str],
        decode: Callable[[bytes], _R],
        start: _R | None,
        *,
        limit: int,
        order: Order,
        match: Callable[[_R], bool] | None,
    ) -> tuple[list[_R], bool]:
        """Walk ``index`` from just after ``start`` until ``limit + 1`` records match (the extra one
        answers has_more), reading records a batch at a time: one script call for the index, one MGET."""
        _check_limit(limit)
        cursor: tuple[str, Any] = ("", 0)
        if start is not None:
            cursor = (_member(start.seq, start.id), _score(start))
        batch = limit + 1 if match is None else max(limit + 1, _SCAN_BATCH)
        found: list[_R] = []
        stale: list[str] = []
        while len(found) <= limit:
            flat = await self._page(keys=[index], args=[*cursor, batch, "1" if order == "desc" else "0"])
            entries = [(_text(member), score) for member, score in zip(flat[::2], flat[1::2], strict=True)]
            if not entries:
                break
            raws = await self._redis.mget([key_of(member[17:]) for member, _ in entries])
            for (member, _), raw in zip(entries, raws, strict=True):
                record = decode(raw) if raw is not None else None
                if record is None or _member(record.seq, record.id) != member:
                    stale.append(member)
                elif scope.sees(record.tenant, record.user) and (match is None or match(record)):
                    found.append(record)
                    if len(found) > limit:
                        break
            cursor = entries[-1]
            if len(entries) < batch:
                break
        if stale:
            await self._redis.zrem(index, *stale)
        return found[:limit], len(found) > limit


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def _score(record: CompletionRecord | ConversationRecord) -> int:
    return record.created if isinstance(record, CompletionRecord) else record.created_at


def _visible(scope: Scope, record: _R) -> _R | None:
    return record if scope.sees(record.tenant, record.user) else None
