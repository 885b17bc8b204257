"""The history store contract: every test runs against the memory store and against a real Redis.

One redis-server serves the module (flushed before each test); a test that stops it gets it back
started by the next one. Tests that are about one store only say so and skip the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from gateway.stores.base import (
    CompletionRecord,
    ConversationRecord,
    Exchange,
    ExchangesRefused,
    HistoryStore,
    Item,
    Order,
    Scope,
    StoreUnavailable,
)
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore
from tests.conftest import RedisServer, SharedRedis

TENANT = Scope("t1")
ALICE = Scope("t1", "alice")
BOB = Scope("t1", "bob")
OTHER_TENANT = Scope("t2")


# Records -------------------------------------------------------------------------------------------


def completion(
    record_id: str,
    *,
    user: str = "alice",
    tenant: str = "t1",
    created: int = 1000,
    model: str = "m1",
    metadata: dict[str, str] | None = None,
) -> CompletionRecord:
    return CompletionRecord(
        id=record_id,
        tenant=tenant,
        user=user,
        created=created,
        model=model,
        messages=[{"role": "user", "content": f"question {record_id}"}],
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": "answer"},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        metadata=metadata or {},
        request_id=f"req-{record_id}",
    )


def conversation(
    record_id: str, *, user: str = "alice", tenant: str = "t1", created_at: int = 1000
) -> ConversationRecord:
    return ConversationRecord(id=record_id, tenant=tenant, user=user, created_at=created_at)


def message(item_id: str, role: str = "user") -> Item:
    kind = "input_text" if role == "user" else "output_text"
    return {
        "type": "message",
        "id": item_id,
        "role": role,
        "content": [{"type": kind, "text": f"text of {item_id}"}],
        "status": "completed",
    }


def ids(values: Sequence[Any]) -> list[str]:
    return [value["id"] if isinstance(value, dict) else value.id for value in values]


async def save_all(store: HistoryStore, records: Sequence[CompletionRecord]) -> None:
    for record in records:
        await store.save(Exchange(completion=record))


async def walk(list_page: Callable[..., Awaitable[tuple[list[Any], bool] | None]], limit: int) -> list[str]:
    """Every id, page by page with ``after``; checks each page against ``limit`` and ``has_more``."""
    seen: list[str] = []
    after = None
    for _ in range(10_000):
        result = await list_page(after=after, limit=limit)
        assert result is not None
        page, more = result
        assert len(page) <= limit
        seen += ids(page)
        if not more:
            return seen
        assert len(page) == limit
        after = ids(page)[-1]
    raise AssertionError("pagination does not end")


# Fixtures ------------------------------------------------------------------------------------------


def redis_client(url: str) -> Redis:
    # One quick retry: enough to reconnect after a restart, short enough that a down server fails fast.
    return Redis.from_url(url, retry=Retry(NoBackoff(), 1), socket_timeout=2, socket_connect_timeout=2)


class Stores:
    """Makes stores of one kind for a test, and moves their clock on: a fake one for memory, the
    wall clock (by sleeping) for Redis."""

    def __init__(self, kind: str, redis: Redis | None = None, server: RedisServer | SharedRedis | None = None):
        self.kind = kind
        self.redis = redis
        self.server = server
        self.now = 1_700_000_000.0

    def __call__(self, **options: Any) -> HistoryStore:
        if self.redis is None:
            return MemoryStore(clock=lambda: self.now, **options)
        return RedisStore(self.redis, **options)

    async def advance(self, seconds: float) -> None:
        if self.redis is None:
            self.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def age(self, seconds: float) -> None:
        """Time passing without the wait: the memory store's clock, or every Redis key's TTL
        shortened (a key whose TTL runs out is deleted, as expiry would)."""
        if self.redis is None:
            self.now += seconds
            return
        for key in await self.redis.keys("*"):
            left = await self.redis.pttl(key)
            if left > 0:
                await self.redis.pexpire(key, left - round(seconds * 1000))


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        yield Stores("memory")
        return
    server: RedisServer | SharedRedis = request.getfixturevalue("redis_module")
    if isinstance(server, RedisServer) and not server.running:
        server.start()  # a test stopped it
    server.flush()
    client = redis_client(server.url)
    try:
        yield Stores("redis", client, server)
    finally:
        await client.aclose()


@pytest.fixture
def store(stores: Stores) -> HistoryStore:
    return stores()


# Stored completions --------------------------------------------------------------------------------


async def test_save_and_get_completion(store: HistoryStore) -> None:
    record = completion("chatcmpl-1", metadata={"k": "v"})
    await store.save(Exchange(completion=record))

    got = await store.get_completion(ALICE, "chatcmpl-1")
    assert got is not None
    assert got.seq > 0
    assert got == CompletionRecord(**{**_fields(record), "seq": got.seq})
    assert await store.get_completion(ALICE, "chatcmpl-missing") is None


async def test_scopes_isolate_tenants_and_users(store: HistoryStore) -> None:
    await save_all(store, [completion("a1"), completion("b1", user="bob"), completion("x1", tenant="t2")])

    assert await store.get_completion(OTHER_TENANT, "a1") is None
    assert await store.get_completion(BOB, "a1") is None
    assert (await store.get_completion(TENANT, "a1")) is not None
    assert ids((await store.list_completions(ALICE))[0]) == ["a1"]
    assert ids((await store.list_completions(BOB))[0]) == ["b1"]
    assert ids((await store.list_completions(TENANT))[0]) == ["a1", "b1"]
    assert ids((await store.list_completions(OTHER_TENANT))[0]) == ["x1"]
    assert await store.list_completions(Scope("t3")) == ([], False)
    # Not visible means absent for every operation.
    assert await store.update_completion(BOB, "a1", {"k": "v"}) is None
    assert await store.delete_completion(OTHER_TENANT, "a1") is False
    assert await store.get_completion(ALICE, "a1") is not None


async def test_names_with_separators_do_not_collide(store: HistoryStore) -> None:
    # Unescaped, tenant "a" + user "b" and tenant "a:u:b" would share their index keys.
    await save_all(store, [completion("c1", tenant="a", user="b"), completion("c2", tenant="a:u:b", user="x")])
    await store.create_conversation(conversation("c", tenant="a", user="b"), [message("i1")])
    await store.create_conversation(conversation("c:items", tenant="a", user="b"), [])

    assert ids((await store.list_completions(Scope("a:u:b")))[0]) == ["c2"]
    assert ids((await store.list_completions(Scope("a", "b")))[0]) == ["c1"]
    assert ids(await store.items(Scope("a"), "c") or []) == ["i1"]
    assert await store.items(Scope("a"), "c:items") == []


async def test_list_orders_by_created_then_insertion(store: HistoryStore) -> None:
    await save_all(
        store,
        [completion(f"c{i}", created=created) for i, created in enumerate([2000, 1000, 2000, 1000], start=1)],
    )
    assert ids((await store.list_completions(ALICE))[0]) == ["c2", "c4", "c1", "c3"]
    assert ids((await store.list_completions(ALICE, order="desc"))[0]) == ["c3", "c1", "c4", "c2"]


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pagination_with_after(store: HistoryStore, order: Order) -> None:
    records = [completion(f"c{i:02d}", created=1000 + i // 3) for i in range(11)]
    await save_all(store, records)
    expected = ids(records if order == "asc" else records[::-1])

    page, more = await store.list_completions(ALICE, limit=4, order=order)
    assert (ids(page), more) == (expected[:4], True)
    page, more = await store.list_completions(ALICE, limit=4, order=order, after=expected[3])
    assert (ids(page), more) == (expected[4:8], True)
    page, more = await store.list_completions(ALICE, limit=4, order=order, after=expected[7])
    assert (ids(page), more) == (expected[8:], False)
    page, more = await store.list_completions(ALICE, limit=3, order=order, after=expected[7])
    assert (ids(page), more) == (expected[8:], False)
    assert await store.list_completions(ALICE, order=order, after=expected[-1]) == ([], False)
    assert await walk(lambda **kw: store.list_completions(ALICE, order=order, **kw), 1) == expected


async def test_after_must_be_visible(store: HistoryStore) -> None:
    await save_all(store, [completion("a1"), completion("b1", user="bob"), completion("a2")])
    assert await store.list_completions(ALICE, after="unknown") == ([], False)
    assert await store.list_completions(ALICE, after="b1") == ([], False)
    # Tenant-wide, bob's record is a place in the order like any other.
    assert ids((await store.list_completions(TENANT, after="b1"))[0]) == ["a2"]


async def test_limit_must_be_positive(store: HistoryStore) -> None:
    await store.create_conversation(conversation("conv"), [message("i0")])
    with pytest.raises(ValueError):
        await store.list_completions(ALICE, limit=0)
    with pytest.raises(ValueError):
        await store.list_conversations(ALICE, limit=-1)
    with pytest.raises(ValueError):
        await store.list_items(ALICE, "conv", limit=0)


async def test_filters_combine_with_pagination(store: HistoryStore) -> None:
    records = [
        completion(f"c{i:02d}", model=f"m{i % 2}", metadata={"topic": "ab"[i % 3 == 0], "n": str(i)}) for i in range(12)
    ]
    await save_all(store, records)

    def listing(**filters: Any) -> Callable[..., Any]:
        return lambda **kw: store.list_completions(ALICE, **filters, **kw)

    assert await walk(listing(model="m0"), 2) == [f"c{i:02d}" for i in range(0, 12, 2)]
    assert await walk(listing(metadata={"topic": "b"}), 3) == ["c00", "c03", "c06", "c09"]
    assert await walk(listing(model="m1", metadata={"topic": "b"}, order="desc"), 1) == ["c09", "c03"]
    assert await walk(listing(metadata={"topic": "b", "n": "6"}), 5) == ["c06"]
    assert await walk(listing(model="nope"), 5) == []
    # `after` is a place in the order, matching the filter or not.
    page, more = await store.list_completions(ALICE, model="m0", after="c03", limit=2)
    assert (ids(page), more) == (["c04", "c06"], True)


async def test_filter_scans_past_many_misses(store: HistoryStore) -> None:
    rare = {7, 130, 228}
    await save_all(store, [completion(f"c{i:03d}", metadata={"rare": "yes"} if i in rare else {}) for i in range(230)])
    expected = [f"c{i:03d}" for i in sorted(rare)]
    assert await walk(lambda **kw: store.list_completions(ALICE, metadata={"rare": "yes"}, **kw), 1) == expected
    page, more = await store.list_completions(TENANT, metadata={"rare": "yes"}, order="desc", limit=2)
    assert (ids(page), more) == (expected[::-1][:2], True)


async def test_update_completion_metadata(store: HistoryStore) -> None:
    await save_all(store, [completion("c1", metadata={"old": "1"})])

    updated = await store.update_completion(ALICE, "c1", {"new": "2"})
    assert updated is not None
    assert updated.metadata == {"new": "2"}
    got = await store.get_completion(TENANT, "c1")
    assert got is not None
    assert got.metadata == {"new": "2"}
    assert got.choices == completion("c1").choices
    assert ids((await store.list_completions(ALICE, metadata={"new": "2"}))[0]) == ["c1"]
    assert await store.update_completion(ALICE, "missing", {}) is None


async def test_delete_completion(store: HistoryStore) -> None:
    await save_all(store, [completion("c1"), completion("c2")])

    assert await store.delete_completion(ALICE, "c1") is True
    assert await store.get_completion(ALICE, "c1") is None
    assert ids((await store.list_completions(TENANT))[0]) == ["c2"]
    assert await store.delete_completion(ALICE, "c1") is False


async def test_saving_the_same_completion_again_changes_nothing(store: HistoryStore) -> None:
    # What a caller retrying a write whose answer it lost does.
    await store.create_conversation(conversation("conv"), [])
    exchange = Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=[message("m1")])
    await store.save(exchange)
    await store.save(exchange)

    assert ids((await store.list_completions(ALICE))[0]) == ["c1"]
    assert ids(await store.items(ALICE, "conv") or []) == ["m1"]


async def test_returned_records_are_copies(store: HistoryStore) -> None:
    await save_all(store, [completion("c1", metadata={"k": "v"})])
    got = await store.get_completion(ALICE, "c1")
    assert got is not None
    got.metadata["k"] = "changed"
    assert (await store.get_completion(ALICE, "c1")).metadata == {"k": "v"}  # type: ignore[union-attr]


# Conversations -------------------------------------------------------------------------------------


async def test_conversation_lifecycle(store: HistoryStore) -> None:
    created = await store.create_conversation(conversation("conv"), [message("i1"), message("i2", "assistant")])
    assert created.id == "conv"
    assert created.seq > 0

    assert await store.get_conversation(ALICE, "conv") == created
    assert await store.get_conversation(TENANT, "conv") == created
    assert await store.get_conversation(BOB, "conv") is None
    assert await store.get_conversation(OTHER_TENANT, "conv") is None
    assert ids(await store.items(ALICE, "conv") or []) == ["i1", "i2"]

    updated = await store.update_conversation(ALICE, "conv", {"title": "t"})
    assert updated is not None
    assert updated.metadata == {"title": "t"}
    assert await store.get_conversation(ALICE, "conv") == updated
    assert await store.update_conversation(BOB, "conv", {}) is None

    assert await store.delete_conversation(BOB, "conv") is False
    assert await store.delete_conversation(ALICE, "conv") is True
    assert await store.get_conversation(ALICE, "conv") is None
    assert await store.items(ALICE, "conv") is None
    assert await store.list_items(ALICE, "conv") is None
    assert await store.delete_conversation(ALICE, "conv") is False
    # Its items went with it: a new conversation of the same id starts empty.
    await store.create_conversation(conversation("conv"), [])
    assert await store.items(ALICE, "conv") == []


async def test_creating_an_existing_conversation_keeps_it(store: HistoryStore) -> None:
    first = await store.create_conversation(conversation("conv"), [message("i1")])
    again = await store.create_conversation(conversation("conv", created_at=5), [message("i2")])
    assert again == first
    assert ids(await store.items(ALICE, "conv") or []) == ["i1"]


async def test_list_conversations(store: HistoryStore) -> None:
    for i, user in enumerate(["alice", "bob", "alice", "alice", "bob"]):
        await store.create_conversation(conversation(f"conv{i}", user=user, created_at=1000 + i // 2), [])
    await store.create_conversation(conversation("elsewhere", tenant="t2"), [])

    page, more = await store.list_conversations(TENANT)
    assert (ids(page), more) == (["conv4", "conv3", "conv2", "conv1", "conv0"], False)
    assert ids((await store.list_conversations(ALICE))[0]) == ["conv3", "conv2", "conv0"]
    assert ids((await store.list_conversations(ALICE, order="asc"))[0]) == ["conv0", "conv2", "conv3"]
    page, more = await store.list_conversations(ALICE, limit=2)
    assert (ids(page), more) == (["conv3", "conv2"], True)
    page, more = await store.list_conversations(ALICE, limit=2, after="conv2")
    assert (ids(page), more) == (["conv0"], False)
    assert await store.list_conversations(ALICE, after="conv1") == ([], False)
    assert await walk(lambda **kw: store.list_conversations(TENANT, **kw), 2) == [f"conv{i}" for i in range(4, -1, -1)]

    await store.delete_conversation(ALICE, "conv2")
    assert ids((await store.list_conversations(ALICE))[0]) == ["conv3", "conv0"]


async def test_items(store: HistoryStore) -> None:
    await store.create_conversation(conversation("conv"), [message("i0")])
    added = await store.add_items(ALICE, "conv", [message("i1"), message("i2", "assistant")])
    assert added == [message("i1"), message("i2", "assistant")]
    await store.add_items(TENANT, "conv", [message("i3"), message("i4", "assistant")])
    assert await store.add_items(BOB, "conv", [message("x")]) is None
    assert await store.add_items(ALICE, "missing", [message("x")]) is None
    assert await store.add_items(ALICE, "conv", []) == []

    page, more = await store.list_items(ALICE, "conv") or ([], True)
    assert (ids(page), more) == (["i4", "i3", "i2", "i1", "i0"], False)
    page, more = await store.list_items(ALICE, "conv", order="asc", limit=2) or ([], False)
    assert (ids(page), more) == (["i0", "i1"], True)
    page, more = await store.list_items(ALICE, "conv", limit=2, after="i3") or ([], False)
    assert (ids(page), more) == (["i2", "i1"], True)
    page, more = await store.list_items(ALICE, "conv", order="asc", after="i2", limit=2) or ([], True)
    assert (ids(page), more) == (["i3", "i4"], False)
    assert await store.list_items(ALICE, "conv", after="nope") == ([], False)
    assert await store.list_items(BOB, "conv") is None
    assert await walk(lambda **kw: store.list_items(ALICE, "conv", **kw), 2) == ["i4", "i3", "i2", "i1", "i0"]

    assert await store.get_item(ALICE, "conv", "i2") == message("i2", "assistant")
    assert await store.get_item(ALICE, "conv", "nope") is None
    assert await store.get_item(BOB, "conv", "i2") is None

    assert await store.delete_item(BOB, "conv", "i2") is None
    deleted = await store.delete_item(ALICE, "conv", "i2")
    assert deleted is not None
    assert deleted.id == "conv"
    assert await store.delete_item(ALICE, "conv", "i2") is None
    assert await store.get_item(ALICE, "conv", "i2") is None
    assert ids(await store.items(ALICE, "conv") or []) == ["i0", "i1", "i3", "i4"]
    assert await store.items(BOB, "conv") is None


async def test_conversations_keep_their_newest_items(stores: Stores) -> None:
    store = stores(max_items=5)
    await store.create_conversation(conversation("conv"), [message(f"i{i}") for i in range(7)])
    assert ids(await store.items(ALICE, "conv") or []) == ["i2", "i3", "i4", "i5", "i6"]
    await store.add_items(ALICE, "conv", [message("i7"), message("i8")])
    await store.save(Exchange(conversation="conv", tenant="t1", items=[message("i9")]))
    assert ids(await store.items(ALICE, "conv") or []) == ["i5", "i6", "i7", "i8", "i9"]


async def test_save_appends_a_turn(store: HistoryStore) -> None:
    await store.create_conversation(conversation("conv"), [message("i0")])
    turn = [message("u1"), message("a1", "assistant")]
    await store.save(Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=turn))
    await store.save(Exchange(conversation="conv", tenant="t1", items=[message("u2")]))
    assert ids(await store.items(ALICE, "conv") or []) == ["i0", "u1", "a1", "u2"]
    assert await store.get_completion(ALICE, "c1") is not None


async def test_save_many_writes_each_exchange_in_order(store: HistoryStore) -> None:
    await store.create_conversation(conversation("conv"), [])
    await store.create_conversation(conversation("gone"), [])
    await store.delete_conversation(ALICE, "gone")
    batch = [
        Exchange(
            completion=completion("c1", created=1001),
            conversation="conv",
            tenant="t1",
            items=[message("u1"), message("a1", "assistant")],
        ),
        Exchange(completion=completion("c2", created=1001)),
        Exchange(conversation="gone", tenant="t1", items=[message("lost")]),
        Exchange(conversation="conv", tenant="t1", items=[message("u2")]),
        Exchange(completion=completion("c3", tenant="t2", user="bob")),
    ]
    await store.save_many(batch)
    assert ids(await store.items(ALICE, "conv") or []) == ["u1", "a1", "u2"]
    assert ids((await store.list_completions(Scope("t1")))[0]) == ["c1", "c2"]  # same second: in batch order
    assert await store.get_completion(Scope("t2", "bob"), "c3") is not None
    assert await store.items(ALICE, "gone") is None
    # The writer retries a batch that failed half-way: an exchange with a completion, saved again,
    # changes nothing (its completion id guards it).
    await store.save_many([exchange for exchange in batch if exchange.completion is not None])
    assert ids(await store.items(ALICE, "conv") or []) == ["u1", "a1", "u2"]
    assert ids((await store.list_completions(Scope("t1")))[0]) == ["c1", "c2"]


async def test_saved_values_keep_any_text(store: HistoryStore) -> None:
    # The Redis store packs a batch's values into one argument by their lengths in bytes.
    odd = "line\none é \u2603 \r\n 12 0 "
    await store.create_conversation(conversation(odd), [])
    item = {"type": "message", "id": odd, "role": "user", "content": [{"type": "input_text", "text": odd}]}
    batch = [
        Exchange(completion=completion(odd, user=odd, metadata={"k": odd}), conversation=odd, items=[item]),
        Exchange(completion=completion("")),
        Exchange(conversation=odd, tenant="t1", items=[{"type": "message", "id": ""}]),
    ]
    await store.save_many(batch)
    got = await store.get_completion(Scope("t1", odd), odd)
    assert got is not None and got.metadata == {"k": odd} and got.user == odd
    assert ids((await store.list_completions(Scope("t1", odd)))[0]) == [odd]
    assert ids((await store.list_completions(Scope("t1")))[0]) == [odd, ""]
    assert await store.items(ALICE, odd) == [item, {"type": "message", "id": ""}]


async def test_one_exchange_the_store_refuses_does_not_stop_the_others(stores: Stores) -> None:
    if stores.redis is None:
        pytest.skip("a Redis key of the wrong type makes the script refuse one exchange")
    store = stores()
    await stores.redis.set("gw:{t1}:u:bob:cmpls", "not a sorted set")
    batch = [Exchange(completion=completion("c1")), Exchange(completion=completion("c2", user="bob"))]
    batch.append(Exchange(completion=completion("c3")))
    with pytest.raises(ExchangesRefused) as refused:
        await store.save_many(batch)
    assert list(refused.value.refused) == [1]
    assert isinstance(refused.value.refused[1], ResponseError) and "WRONGTYPE" in str(refused.value.refused[1])
    assert ids((await store.list_completions(ALICE))[0]) == ["c1", "c3"]


async def test_save_drops_items_of_a_deleted_conversation(stores: Stores) -> None:
    store = stores()
    await store.create_conversation(conversation("conv"), [message("i0")])
    await store.delete_conversation(ALICE, "conv")

    await store.save(Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=[message("u")]))
    await store.save(Exchange(conversation="never", tenant="t1", items=[message("u")]))

    assert await store.get_completion(ALICE, "c1") is not None
    assert await store.get_conversation(ALICE, "conv") is None
    assert await store.items(ALICE, "conv") is None
    if stores.redis is not None:
        assert await stores.redis.keys("*:items") == []


async def test_concurrent_saves_keep_each_turn_together(store: HistoryStore) -> None:
    await store.create_conversation(conversation("conv"), [])

    await asyncio.gather(
        *(
            store.save(
                Exchange(
                    completion=completion(f"c{i}"),
                    conversation="conv",
                    tenant="t1",
                    items=[message(f"user{i}"), message(f"assistant{i}", "assistant")],
                )
            )
            for i in range(20)
        )
    )

    items = ids(await store.items(ALICE, "conv") or [])
    assert len(items) == 40
    assert sorted(items) == sorted([f"user{i}" for i in range(20)] + [f"assistant{i}" for i in range(20)])
    for user, assistant in zip(items[::2], items[1::2], strict=True):
        assert user.startswith("user")
        assert assistant == f"assistant{user.removeprefix('user')}"
    page, more = await store.list_completions(ALICE, limit=100)
    assert (len(page), more) == (20, False)


async def test_default_conversation(store: HistoryStore) -> None:
    firsts = await asyncio.gather(*(store.default_conversation(ALICE, conversation(f"conv-a{i}")) for i in range(10)))
    assert len({record.id for record in firsts}) == 1
    default = firsts[0]
    assert await store.get_conversation(ALICE, default.id) == default
    assert ids((await store.list_conversations(ALICE))[0]) == [default.id]

    assert await store.default_conversation(ALICE, conversation("conv-later")) == default
    bobs = await store.default_conversation(BOB, conversation("conv-b", user="bob"))
    assert bobs.id == "conv-b"
    assert await store.default_conversation(BOB, conversation("conv-b2", user="bob")) == bobs
    assert (await store.default_conversation(TENANT, conversation("conv-t"))).id == "conv-t"

    # Deleted, it is replaced on the next call.
    await store.delete_conversation(ALICE, default.id)
    assert (await store.default_conversation(ALICE, conversation("conv-a-new"))).id == "conv-a-new"

    with pytest.raises(ValueError):
        await store.default_conversation(ALICE, conversation("conv-x", user="bob"))


# Expiry --------------------------------------------------------------------------------------------


async def test_records_expire_a_ttl_after_their_last_write(stores: Stores) -> None:
    store = stores(ttl_seconds=0.6)
    await store.create_conversation(conversation("conv"), [message("i0")])
    await store.save(Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=[message("i1")]))
    await stores.advance(0.4)
    await store.save(Exchange(completion=completion("c2"), conversation="conv", tenant="t1", items=[message("i2")]))
    await stores.advance(0.35)

    # c1 is 0.75 s old; the conversation and c2 were written 0.35 s ago.
    assert await store.get_completion(ALICE, "c1") is None
    assert ids((await store.list_completions(ALICE))[0]) == ["c2"]
    assert ids(await store.items(ALICE, "conv") or []) == ["i0", "i1", "i2"]
    assert ids((await store.list_conversations(ALICE))[0]) == ["conv"]
    if stores.redis is not None:
        # The listing skipped the expired record's entry and removed it from the index it read.
        assert await stores.redis.zcard("gw:{t1}:u:alice:cmpls") == 1

    await stores.advance(0.35)
    assert await store.get_completion(ALICE, "c2") is None
    assert await store.get_conversation(ALICE, "conv") is None
    assert await store.items(ALICE, "conv") is None
    assert await store.list_completions(TENANT) == ([], False)
    assert await store.list_conversations(TENANT) == ([], False)


async def test_writes_refresh_the_ttl(stores: Stores) -> None:
    store = stores(ttl_seconds=100)
    await save_all(store, [completion("c1"), completion("c2")])
    await store.create_conversation(conversation("conv"), [message("i0")])
    await store.create_conversation(conversation("idle"), [])
    default = await store.default_conversation(BOB, conversation("conv-bob", user="bob"))
    await stores.age(70)
    await store.update_completion(ALICE, "c1", {"k": "v"})
    await store.update_conversation(ALICE, "conv", {"k": "v"})
    assert await store.default_conversation(BOB, conversation("conv-bob2", user="bob")) == default
    await store.save(Exchange(conversation=default.id, tenant="t1", items=[message("b0")]))
    await stores.age(70)

    assert await store.get_completion(ALICE, "c2") is None
    assert ids((await store.list_completions(ALICE))[0]) == ["c1"]
    assert await store.get_conversation(ALICE, "idle") is None
    assert ids((await store.list_conversations(TENANT))[0]) == ["conv-bob", "conv"]
    assert ids(await store.items(ALICE, "conv") or []) == ["i0"]
    assert await store.default_conversation(BOB, conversation("conv-bob3", user="bob")) == default
    assert ids(await store.items(BOB, default.id) or []) == ["b0"]

    await store.add_items(ALICE, "conv", [message("i1")])
    await stores.age(70)
    assert ids(await store.items(ALICE, "conv") or []) == ["i0", "i1"]
    await store.delete_item(ALICE, "conv", "i1")
    await stores.age(70)
    assert ids(await store.items(ALICE, "conv") or []) == ["i0"]
    await stores.age(31)
    assert await store.items(ALICE, "conv") is None


async def test_every_redis_key_gets_the_ttl(stores: Stores) -> None:
    if stores.redis is None:
        pytest.skip("about Redis keys")
    store = stores(ttl_seconds=100)
    await store.create_conversation(conversation("conv"), [message("i0")])
    await store.save(Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=[message("i1")]))
    await store.default_conversation(ALICE, conversation("conv-default"))
    await store.default_conversation(TENANT, conversation("conv-tenant"))
    await store.add_items(ALICE, "conv-default", [message("d0")])

    keys = sorted(key.decode() for key in await stores.redis.keys("*"))
    assert keys == sorted(
        [
            "gw:{t1}:seq",
            "gw:{t1}:cmpl:c1",
            "gw:{t1}:cmpls",
            "gw:{t1}:u:alice:cmpls",
            "gw:{t1}:conv:conv",
            "gw:{t1}:conv:conv:items",
            "gw:{t1}:conv:conv-default",
            "gw:{t1}:conv:conv-default:items",
            "gw:{t1}:conv:conv-tenant",
            "gw:{t1}:convs",
            "gw:{t1}:u:alice:convs",
            "gw:{t1}:u:alice:default",
            "gw:{t1}:default",
        ]
    )
    for key in keys:
        assert 0 < await stores.redis.ttl(key) <= 100, key


async def test_memory_sweeps_expired_records(stores: Stores) -> None:
    if stores.redis is not None:
        pytest.skip("the memory store's own housekeeping")
    store = stores(ttl_seconds=10)
    assert isinstance(store, MemoryStore)
    await save_all(store, [completion(f"c{i}") for i in range(5)])
    await store.create_conversation(conversation("conv"), [message("i0")])
    await store.default_conversation(ALICE, conversation("conv-default"))
    stores.now += 11
    await save_all(store, [completion("fresh", tenant="t2")])
    assert list(store._completions) == ["t2"]
    assert store._conversations == {}
    assert store._defaults == {}


async def test_redis_client_that_decodes_responses(stores: Stores) -> None:
    if stores.server is None:
        pytest.skip("about Redis client options")
    client = Redis.from_url(stores.server.url, decode_responses=True)
    try:
        store = RedisStore(client, ttl_seconds=100)
        default = await store.default_conversation(ALICE, conversation("conv"))
        assert await store.default_conversation(ALICE, conversation("conv2")) == default
        await store.save(Exchange(completion=completion("c1"), conversation="conv", tenant="t1", items=[message("i")]))
        assert ids((await store.list_completions(ALICE, metadata={}))[0]) == ["c1"]
        assert ids((await store.list_conversations(ALICE))[0]) == ["conv"]
        assert await store.get_item(ALICE, "conv", "i") == message("i")
        assert await store.delete_item(ALICE, "conv", "i") == default
    finally:
        await client.aclose()


# Redis down ----------------------------------------------------------------------------------------


async def test_redis_down_raises_store_unavailable(stores: Stores) -> None:
    if stores.redis is None or not isinstance(stores.server, RedisServer):
        pytest.skip("needs a redis-server this test can stop")
    store = stores()
    await store.ping()
    stores.server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.save(Exchange(completion=completion("c1")))
        with pytest.raises(StoreUnavailable):
            await store.get_completion(ALICE, "c1")
        with pytest.raises(StoreUnavailable):
            await store.list_completions(ALICE)
        with pytest.raises(StoreUnavailable):
            await store.default_conversation(ALICE, conversation("conv"))
    finally:
        stores.server.start()
    await store.ping()
    await store.save(Exchange(completion=completion("c1")))
    assert await store.get_completion(ALICE, "c1") is not None


# Pagination, for any records -----------------------------------------------------------------------

_records = st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.integers(0, 3), st.booleans()), max_size=25)


async def _check_pages(
    store: HistoryStore, records: list[tuple[str, int, bool]], limit: int, order: Order, scope: Scope, model: str | None
) -> None:
    saved = [
        completion(f"c{i}", user=user, created=created, model="m0" if m0 else "m1")
        for i, (user, created, m0) in enumerate(records)
    ]
    await save_all(store, saved)
    visible = [r for r in saved if scope.sees(r.tenant, r.user) and model in (None, r.model)]
    expected = ids(sorted(visible, key=lambda r: (r.created, int(r.id[1:])), reverse=order == "desc"))
    listing = await walk(lambda **kw: store.list_completions(scope, model=model, order=order, **kw), limit)
    assert listing == expected


_pages = given(
    records=_records,
    limit=st.integers(1, 7),
    order=st.sampled_from(["asc", "desc"]),
    scope=st.sampled_from([TENANT, ALICE]),
    model=st.sampled_from([None, "m0"]),
)


@settings(max_examples=200, deadline=None)
@_pages
def test_pages_visit_every_record_once_in_order(
    records: list[tuple[str, int, bool]], limit: int, order: Order, scope: Scope, model: str | None
) -> None:
    asyncio.run(_check_pages(MemoryStore(), records, limit, order, scope, model))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@_pages
def test_pages_on_redis(
    redis_module: RedisServer | SharedRedis,
    records: list[tuple[str, int, bool]],
    limit: int,
    order: Order,
    scope: Scope,
    model: str | None,
) -> None:
    if isinstance(redis_module, RedisServer) and not redis_module.running:
        redis_module.start()
    redis_module.flush()

    async def check() -> None:
        client = redis_client(redis_module.url)
        try:
            await _check_pages(RedisStore(client), records, limit, order, scope, model)
        finally:
            await client.aclose()

    asyncio.run(check())


def _fields(record: CompletionRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__struct_fields__}
