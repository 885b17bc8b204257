"""What ships beside the code: the example configs, the compose files and the Dockerfile.

No Docker engine runs in CI, so the compose files are checked against the Compose specification's
JSON schema (shipped inside check-jsonschema) and read for what the gateway needs from them; the
Dockerfile is read for what a safe, small image needs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec
import pytest
import yaml

from gateway.settings import BackendSettings, KeySettings, Settings, load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.toml"))
COMPOSE_FILES = sorted(ROOT.glob("compose.*.yaml"))
DOCKERFILE = ROOT / "Dockerfile"
CONFIG_IN_CONTAINER = "/etc/gateway/gateway.toml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _clean_env(*files: Path) -> dict[str, str]:
    """This process's environment without the variables the files interpolate, so that a test sees
    the `${VAR:-default}` defaults and not whatever the machine running it has set."""
    names = {name for f in files for name in _VAR.findall(f.read_text(encoding="utf-8"))}
    names |= {"GATEWAY_CONFIG"}
    return {k: v for k, v in os.environ.items() if k not in names}


def _check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env if env is not None else _clean_env(path),
        stdin=subprocess.DEVNULL,
    )


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _bind_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for the service's bind mounts, short or long syntax."""
    mounts: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target, *rest = volume.split(":")
            if source.startswith((".", "/")):
                mounts[target] = (source, "ro" in (rest[0].split(",") if rest else []))
        elif volume.get("type") == "bind":
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


# --- config/*.toml --------------------------------------------------------------------------------


def test_the_example_configs_are_there() -> None:
    assert {p.name for p in CONFIGS} >= {"gateway.toml", "vllm.toml", "ollama.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_config_loads_with_an_empty_environment(path: Path) -> None:
    settings = load_file(path, environ={})
    assert settings.backends


def test_gateway_toml_runs_the_mock_backend_out_of_the_box() -> None:
    settings = load_file(ROOT / "config" / "gateway.toml", environ={})
    assert [(b.name, b.kind) for b in settings.backends] == [("mock", "mock")]
    assert settings.server.port == 8000


def test_gateway_toml_documents_every_key() -> None:
    """Every key of every section appears in the documented example, active or commented out."""
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    missing = []
    for section in msgspec.structs.fields(Settings):
        if section.name in ("backends", "keys", "models", "aliases"):
            header = re.escape(f"[{section.name}]" if section.name == "aliases" else f"[[{section.name}]]")
            if not re.search(rf"^(# )?{header}", text, re.M):
                missing.append(section.name)
            continue
        if not re.search(rf"^\[{section.name}\]", text, re.M):
            missing.append(f"[{section.name}]")
            continue
        for field in msgspec.structs.fields(section.default_factory):
            if not re.search(rf"^(# )?{field.name} = ", text, re.M):
                missing.append(f"{section.name}.{field.name}")
    for table, struct in (("backends", BackendSettings), ("keys", KeySettings)):
        for field in msgspec.structs.fields(struct):
            if not re.search(rf"^#\s+{field.name}\s", text, re.M):
                missing.append(f"{table}.{field.name}")
    assert not missing, f"config/gateway.toml does not document: {', '.join(missing)}"


def test_gateway_toml_commented_examples_load_once_uncommented(tmp_path: Path) -> None:
    """Uncommenting an example must give a working config, not a typo to debug."""
    text = (ROOT / "config" / "gateway.toml").read_text(encoding="utf-8")
    # One level of `# ` off every line that is TOML: a table header or `key = value`.
    uncommented = re.sub(r"^# (?=\[\[(backends|keys|models)\]\]|[a-z_]+ = )", "", text, flags=re.M)
    assert uncommented != text
    path = tmp_path / "gateway.toml"
    path.write_text(uncommented, encoding="utf-8")
    settings = load_file(
        path,
        environ={
            "OPENAI_API_KEY": "sk-example",
            "GATEWAY_MASTER_KEY": "sk-master-example",
            "TEAM_A_KEY": "sk-team-a-example",
        },
    )
    assert {b.kind for b in settings.backends} == {"mock", "vllm", "ollama", "openai"}
    assert settings.redis.url is not None


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_check_config_accepts_every_shipped_config(path: Path) -> None:
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "check-config should print what it resolved"


@pytest.mark.parametrize(
    ("server_section", "key"),
    [("prot = 1", "prot"), ('port = "x"', "port")],
    ids=["misspelt key", "wrong type"],
)
def test_check_config_rejects_a_broken_config_naming_file_and_key(
    tmp_path: Path, server_section: str, key: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(f'[server]\n{server_section}\n\n[[backends]]\nname = "mock"\nkind = "mock"\n', encoding="utf-8")
    result = _check_config(path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(path) in result.stderr
    assert re.search(rf"\b{key}\b", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


# --- compose.*.yaml -------------------------------------------------------------------------------


def test_both_compose_files_are_there() -> None:
    assert {p.name for p in COMPOSE_FILES} >= {"compose.vllm.yaml", "compose.ollama.yaml"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_file_follows_the_compose_spec(path: Path) -> None:
    check_jsonschema = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(check_jsonschema), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_gateway_mounts_a_shipped_config_that_names_its_services(path: Path) -> None:
    services = _compose(path)["services"]
    gateway = services["gateway"]
    config = _environment(gateway)["GATEWAY_CONFIG"]
    mounts = _bind_mounts(gateway)
    assert config in mounts, f"GATEWAY_CONFIG={config} is not a bind mount of the gateway service"
    source, read_only = mounts[config]
    assert read_only
    config_file = (path.parent / source).resolve()
    assert config_file.is_file()
    assert config_file.parent == ROOT / "config"

    # The hosts the config reaches (with its defaults) are services of this compose file.
    settings = load_file(config_file, environ={})
    hosts = {urlparse(b.base_url).hostname for b in settings.backends if b.base_url}
    if settings.redis.url:
        hosts.add(urlparse(settings.redis.url).hostname)
    assert hosts <= set(services), f"{config_file.name} reaches {hosts - set(services)}, not in {path.name}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_gateway_is_built_here_and_checks_health(path: Path) -> None:
    gateway = _compose(path)["services"]["gateway"]
    assert gateway["build"] in (".", {"context": "."}) or gateway["build"].get("context") == "."
    assert "/health" in _healthcheck_command(gateway)
    assert any(str(p).endswith(":8000") for p in gateway["ports"])


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_services_it_depends_on_have_healthchecks(path: Path) -> None:
    services = _compose(path)["services"]
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}'s health"


def test_compose_vllm_waits_for_a_healthy_vllm_and_redis() -> None:
    services = _compose(ROOT / "compose.vllm.yaml")["services"]
    depends = services["gateway"]["depends_on"]
    assert depends["vllm"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    assert "--model" in vllm["command"]
    assert "/health" in _healthcheck_command(vllm)
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert "redis-cli ping" in _healthcheck_command(services["redis"])


def test_compose_ollama_pulls_the_model_before_the_gateway_starts() -> None:
    compose = _compose(ROOT / "compose.ollama.yaml")
    services = compose["services"]
    depends = services["gateway"]["depends_on"]
    assert depends["ollama-pull"]["condition"] == "service_completed_successfully"
    assert depends["redis"]["condition"] == "service_healthy"

    pull = services["ollama-pull"]
    assert pull["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert pull["restart"] == "no"
    assert _environment(pull)["OLLAMA_HOST"] == "ollama:11434"
    command = pull["command"] if isinstance(pull["command"], str) else " ".join(pull["command"])
    # The model pulled is the one the gateway's config routes to.
    settings = load_file(ROOT / "config" / "ollama.toml", environ={})
    (model,) = settings.backends[0].models or []
    assert command.endswith(f"pull {model}")

    assert "ollama list" in _healthcheck_command(services["ollama"])
    # The models live in a named volume, so they survive `docker compose down`.
    volume = next(v for v in services["ollama"]["volumes"] if "/root/.ollama" in str(v))
    assert str(volume).split(":")[0] in compose["volumes"]


# --- Dockerfile -----------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs. As Docker does, comment lines are dropped first (even inside a
    continued instruction), then continued lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"^\s*#.*\n", "", text, flags=re.M)
    pairs = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    froms = [args for name, args in _instructions() if name == "FROM"]
    assert len(froms) >= 2
    args = dict(a.split("=", 1) for name, a in _instructions() if name == "ARG" and "=" in a)
    final = froms[-1].split()[0]
    final = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), final)
    assert final == "python:3.11-slim"
    assert any(name == "COPY" and "--from=" in a for name, a in _final_stage())


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for name, args in _final_stage() if name == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_checks_health_and_runs_the_gateway() -> None:
    final = dict(_final_stage())
    assert "/health" in final["HEALTHCHECK"]
    assert "curl" not in final["HEALTHCHECK"], "python:3.11-slim has no curl"
    assert final["EXPOSE"].split() == ["8000"]
    assert final["ENTRYPOINT"] == '["gateway"]'
    assert final["CMD"].startswith('["serve"')


def test_dockerfile_copies_only_files_that_exist_and_dockerignore_lets_through() -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for name, args in _instructions():
        if name != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
            assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, (
                f".dockerignore keeps {source} out of the build context"
            )
