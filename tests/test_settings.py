from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ConfigError, from_env, load, load_file, redact_url


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


MINIMAL = """
[[backends]]
name = "vllm"
kind = "vllm"
base_url = "http://vllm:8000/v1"
"""


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    settings = load_file(write(tmp_path, MINIMAL), {})
    assert settings.server.port == 8000
    assert settings.backends[0].models is None  # discovered
    assert settings.timeouts.first_token == 120.0


def test_env_interpolation_and_default(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'api_key = "${VLLM_KEY}"\n[redis]\nurl = "${REDIS:-redis://r:6379/0}"\n')
    settings = load_file(path, {"VLLM_KEY": "s3cret"})
    assert settings.backends[0].api_key == "s3cret"
    assert settings.redis.url == "redis://r:6379/0"


def test_missing_env_var_names_file_key_and_variable(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'api_key = "${VLLM_KEY}"\n')
    with pytest.raises(ConfigError) as info:
        load_file(path, {})
    message = str(info.value)
    assert str(path) in message and "backends[0].api_key" in message and "VLLM_KEY" in message


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, "[server]\nprot = 1\n" + MINIMAL), {})
    message = str(info.value)
    assert "unknown key `prot`" in message and "[server]" in message and "port" in message


def test_unknown_key_in_backend_lists_backend_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, MINIMAL + "modles = []\n"), {})
    assert "`modles`" in str(info.value) and "models" in str(info.value) and "base_url" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "x"\n', "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[timeouts]\nidle = 0\n", "timeouts.idle"),
    ],
)
def test_wrong_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(write(tmp_path, text + MINIMAL), {})
    assert f"`{key}`" in str(info.value)


def test_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\]\.kind"):
        load_file(write(tmp_path, MINIMAL.replace('kind = "vllm"', 'kind = "vlm"')), {})


def test_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(write(tmp_path, "[server\n"), {})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_file("/nonexistent/gateway.toml", {})


def test_semantic_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base_url` is missing"):
        load_file(write(tmp_path, '[[backends]]\nname = "a"\nkind = "openai"\n'), {})
    with pytest.raises(ConfigError, match="used twice"):
        load_file(write(tmp_path, MINIMAL + MINIMAL), {})
    with pytest.raises(ConfigError, match="no \\[\\[backends\\]\\]"):
        load_file(write(tmp_path, "[server]\nport = 1234\n"), {})
    with pytest.raises(ConfigError, match="not an http"):
        load_file(write(tmp_path, MINIMAL.replace("http://vllm:8000/v1", "vllm:8000")), {})


def test_environment_with_nothing_set_is_the_mock() -> None:
    settings = from_env({})
    assert [(b.name, b.kind, b.models) for b in settings.backends] == [("mock", "mock", ["mock"])]


def test_environment_of_the_replaced_service() -> None:
    settings = from_env(
        {
            "LLM_BASE_URL": "http://llm:8000/v1",
            "LLM_MODEL": "qwen",
            "LLM_API_KEY": "k",
            "REDIS_URL": "redis://x:1/0",
            "APP_PORT": "9000",
            "LOG_LEVEL": "DEBUG",
        }
    )
    (backend,) = settings.backends
    assert (backend.base_url, backend.models, backend.api_key) == ("http://llm:8000/v1", ["qwen"], "k")
    assert settings.server.port == 9000 and settings.redis.url == "redis://x:1/0" and settings.logging.level == "debug"


def test_provider_convention_routes_by_prefix() -> None:
    settings = from_env(
        {
            "OPENAI_API_KEY": "o",
            "GEMINI_API_KEY": "g",
            "ANTHROPIC_API_KEY": "a",
            "ANTHROPIC_BASE_URL": "http://claude.local/v1",
        }
    )
    by_name = {b.name: b for b in settings.backends}
    assert by_name["openai"].models == ["*"] and by_name["openai"].base_url == "https://api.openai.com/v1"
    assert by_name["gemini"].models == ["gemini*"]
    assert by_name["anthropic"].base_url == "http://claude.local/v1"


def test_master_key_from_the_environment() -> None:
    assert from_env({"GATEWAY_MASTER_KEY": "sk-master"}).auth.master_key == "sk-master"
    assert from_env({}).auth.master_key is None


def test_bad_app_port_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="APP_PORT"):
        from_env({"APP_PORT": "eighty"})
    with pytest.raises(ConfigError, match="APP_PORT"):
        from_env({"APP_PORT": "99999"})


def test_load_order(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert load(None, {"GATEWAY_CONFIG": str(path)})[1] == str(path)
    assert load(str(path), {})[1] == str(path)
    assert load(None, {})[1] == "environment"


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
