"""The history writer: batches, a record the store rejects, a store that goes away."""

from __future__ import annotations

import asyncio

from gateway.history import History
from gateway.reply import Reply
from gateway.settings import HistorySettings
from gateway.stores.base import Exchange, ExchangesRefused, StoreUnavailable
from gateway.stores.memory import MemoryStore
from gateway.wire import decode_completion


class FlakyStore(MemoryStore):
    """A memory store that refuses exchanges tagged "bad" and can be taken down."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.batches: list[int] = []

    async def save_many(self, exchanges: list[Exchange]) -> None:
        if self.down:
            raise StoreUnavailable("down")
        self.batches.append(len(exchanges))
        if any(e.tenant == "bad" for e in exchanges):
            raise ValueError("refused")
        await super().save_many(exchanges)

    async def save(self, exchange: Exchange) -> None:
        if self.down:
            raise StoreUnavailable("down")
        if exchange.tenant == "bad":
            raise ValueError("refused")
        await super().save(exchange)


def exchange(tenant: str, conversation: str = "conv") -> Exchange:
    return Exchange(conversation=conversation, tenant=tenant, items=[{"type": "message", "id": tenant}])


async def test_queued_records_are_written_in_batches_and_a_rejected_one_alone_is_dropped() -> None:
    store = FlakyStore()
    history = History(store, HistorySettings())
    for tenant in ("a", "bad", "b"):
        history.submit(exchange(tenant))
    writer = asyncio.create_task(history.run())
    await history.drain(2)
    writer.cancel()
    assert store.batches[0] == 3  # one batch for all three
    assert (history.written, history.dropped, history.queued) == (2, 1, 0)


class RefusingStore(MemoryStore):
    """A memory store that writes every exchange but those tagged "bad", and says which it refused."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []

    async def save_many(self, exchanges: list[Exchange]) -> None:
        refused: dict[int, Exception] = {}
        for n, exchange in enumerate(exchanges):
            if exchange.tenant == "bad":
                refused[n] = ValueError("wrong type")
            else:
                self.saved.append(exchange.tenant)
        if refused:
            raise ExchangesRefused(refused)

    async def save(self, exchange: Exchange) -> None:
        raise AssertionError("refused exchanges are not retried one by one")


async def test_refused_records_are_dropped_and_the_rest_of_their_batch_not_written_again() -> None:
    store = RefusingStore()
    history = History(store, HistorySettings())
    for tenant in ("a", "bad", "b", "bad"):
        history.submit(exchange(tenant))
    writer = asyncio.create_task(history.run())
    await history.drain(2)
    writer.cancel()
    assert store.saved == ["a", "b"]
    assert (history.written, history.dropped, history.queued, history.degraded) == (2, 2, 0, None)


async def test_records_wait_while_the_store_is_down() -> None:
    store = FlakyStore()
    store.down = True
    history = History(store, HistorySettings())
    writer = asyncio.create_task(history.run())
    for tenant in ("a", "b"):
        history.submit(exchange(tenant))
    await asyncio.sleep(0.3)
    assert history.queued == 2 and history.degraded == "down"
    store.down = False
    await history.drain(3)
    writer.cancel()
    assert (history.written, history.queued, history.degraded) == (2, 0, None)


def test_a_reply_is_recorded_with_its_choices_in_order() -> None:
    reply = Reply()
    assert reply.choices("cancelled") == [
        {"index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None, "finish_reason": "cancelled"}
    ]
    reply.observe_completion(
        decode_completion(
            b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":['
            b'{"index":1,"message":{"role":"assistant","content":"second"},"finish_reason":null},'
            b'{"index":0,"message":{"role":"assistant","content":"first"},"finish_reason":"stop"}]}'
        )
    )
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in reply.choices("error")] == [
        (0, "first", "stop"),
        (1, "second", "error"),
    ]
