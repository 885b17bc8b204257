from __future__ import annotations

import httpx
import pytest

from gateway.backends import Backend
from gateway.errors import ModelNotFound, NoBackendAvailable
from gateway.routing import listed_models, resolve
from gateway.settings import BackendSettings

client = httpx.AsyncClient()


def backend(name: str, models: list[str] | None, weight: float = 1.0) -> Backend:
    return Backend(
        BackendSettings(name=name, kind="openai", base_url="http://x/v1", models=models, weight=weight), client
    )


def test_exact_name_beats_patterns() -> None:
    catch_all, gemini, local = backend("openai", ["*"]), backend("gemini", ["gemini*"]), backend("llm", ["gemini-x"])
    backends = [catch_all, gemini, local]
    assert resolve("gemini-x", backends, {}).backends == (local,)
    assert resolve("gemini-2.0", backends, {}).backends == (gemini,)
    assert resolve("gpt-4o", backends, {}).backends == (catch_all,)


def test_alias_rewrites_the_served_name() -> None:
    route = resolve("fast", [backend("a", ["qwen"])], {"fast": "qwen"})
    assert (route.model, route.served, route.aliased) == ("fast", "qwen", True)
    assert not resolve("qwen", [backend("a", ["qwen"])], {"fast": "qwen"}).aliased


def test_unknown_model_is_404() -> None:
    with pytest.raises(ModelNotFound):
        resolve("nope", [backend("a", ["qwen"])], {})


def test_known_but_unserved_is_503() -> None:
    down = backend("a", ["qwen"])
    down.mark_down("connect refused")
    with pytest.raises(NoBackendAvailable, match="connect refused"):
        resolve("qwen", [down], {})
    with pytest.raises(NoBackendAvailable):
        resolve("fast", [backend("a", ["other"])], {"fast": "qwen"})


def test_fewest_in_flight_per_weight_first() -> None:
    a, b = backend("a", ["m"]), backend("b", ["m"], weight=2.0)
    a.in_flight, b.in_flight = 3, 2
    # a: (3 + <1) / 1 >= 3, b: (2 + <1) / 2 < 1.5
    assert [x.name for x in resolve("m", [a, b], {}).backends] == ["b", "a"]
    a.in_flight = b.in_flight = 0
    firsts = [resolve("m", [a, b], {}).backends[0].name for _ in range(400)]
    assert 0.6 < firsts.count("b") / 400 < 0.9  # ties go more often to the heavier backend


def test_discovering_backend_is_down_until_it_knows_its_models() -> None:
    discovering = backend("a", None)
    assert not discovering.up
    with pytest.raises(ModelNotFound):
        resolve("m", [discovering], {})


def test_listed_models_include_aliases_but_not_patterns() -> None:
    backends = [backend("a", ["m1", "m2"]), backend("openai", ["*"])]
    assert listed_models(backends, {"fast": "m1", "gpt": "gpt-4o", "m2": "m1"}) == [
        ("m1", "a"),
        ("m2", "a"),
        ("fast", "a"),
        ("gpt", "openai"),
    ]
