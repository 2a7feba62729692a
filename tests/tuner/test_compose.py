"""``docker-compose.yml``, ``Dockerfile``, ``.env.example``, ``.dockerignore``, checked by structure.

There is no Docker engine on our machines, so the compose file is parsed (``yaml.safe_load``)
and its ``${VAR}`` references interpolated from ``.env.example`` the way compose does; its
commands are then checked flag by flag, the worker's command is parsed by ``cnn3d-tune``'s own
CLI, and the MLflow server command runs natively (PostgreSQL backend) to check that its
``--allowed-hosts`` lets the other containers in by service name and keeps foreign hosts out.
"""

from __future__ import annotations

import re
import shlex
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

try:  # tests/tuner is a package when it has an __init__.py, plain folder otherwise
    from .conftest import start_mlflow_server
except ImportError:
    from conftest import start_mlflow_server

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"postgres", "mlflow", "optuna-dashboard", "worker"}
VARIABLE = re.compile(r"\$(\$)|\$\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")


# --------------------------------------------------------------------------- loading


def env_example() -> dict[str, str]:
    """``KEY=VALUE`` lines of ``.env.example``."""
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def referenced_variables(text: str) -> set[str]:
    """Every ``${VAR...}`` the compose file reads (``$$`` is a literal dollar)."""
    return {m.group(2) for m in VARIABLE.finditer(text) if m.group(2)}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``$$``."""

    def value(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name, op, arg = match.group(2), match.group(3), match.group(4)
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"${{{name}}} is required: {arg}")
        if op and op.endswith("-") and unset:
            return interpolate(arg, env)
        return current or ""

    return VARIABLE.sub(value, text)


@pytest.fixture(scope="module")
def raw() -> dict:
    """The compose file as written (``${...}`` left in)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as docker compose would see it with ``.env`` copied from ``.env.example``."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))


def command(service: dict) -> list[str]:
    """A service's command as an argument list."""
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` (``--flag value`` or ``--flag=value``)."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def published(service: dict) -> list[tuple[str, str]]:
    """(host ip, container port) of every published port, short or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port["target"])))
        else:
            parts = str(port).split(":")
            out.append((parts[0] if len(parts) == 3 else "", parts[-1]))
    return out


# --------------------------------------------------------------------------- the compose file


def test_services_and_project(compose):
    assert set(compose["services"]) == SERVICES
    assert compose.get("name") == "cnn3d"


def test_every_published_port_is_bound_to_loopback(compose):
    seen = {}
    for name, service in compose["services"].items():
        for host_ip, target in published(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {target} on {host_ip or 'all interfaces'}"
            seen[name] = target
    assert seen == {"postgres": "5432", "mlflow": "5000", "optuna-dashboard": "8080"}
    assert "127.0.0.1:5000:5000" in compose["services"]["mlflow"]["ports"]


def test_state_lives_in_named_volumes(compose):
    declared = set(compose["volumes"])
    assert {"pgdata", "mlartifacts", "embeddings"} <= declared
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
            assert source in declared, f"{name} mounts {source!r}, not a named volume"
    assert "pgdata:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]


def test_postgres_credentials_healthcheck_and_databases(raw, compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert "${" in str(raw["services"]["postgres"]["environment"][key]), f"{key} must come from .env"
    check = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in check and "$${POSTGRES_USER}" in " ".join(raw["services"]["postgres"]["healthcheck"]["test"])
    assert postgres["healthcheck"]["retries"] >= 3
    # MLflow and Optuna both keep an alembic_version table: two databases, the second made at first start
    env = env_example()
    assert env["OPTUNA_DB"] != env["MLFLOW_DB"]
    init = postgres["configs"][0]
    assert init["target"].startswith("/docker-entrypoint-initdb.d/")
    assert f'CREATE DATABASE "{env["MLFLOW_DB"]}"' in compose["configs"][init["source"]]["content"]


def test_mlflow_server_command(compose):
    mlflow = compose["services"]["mlflow"]
    args = command(mlflow)
    env = env_example()
    assert args[:2] == ["mlflow", "server"]
    backend = flag(args, "--backend-store-uri")
    assert backend == (f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                       f"@postgres:5432/{env['MLFLOW_DB']}")
    assert "--serve-artifacts" in args
    destination = flag(args, "--artifacts-destination")
    assert f"mlartifacts:{destination}" in mlflow["volumes"]
    assert flag(args, "--host") == "0.0.0.0" and flag(args, "--port") == "5000"
    allowed = flag(args, "--allowed-hosts").split(",")
    assert {"mlflow", "mlflow:5000"} <= set(allowed), "workers reach the server as mlflow:5000"
    assert "127.0.0.1:*" in allowed, "the published port (and SSH tunnels) arrive as 127.0.0.1:PORT"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])


def test_dashboard_reads_the_study_database(compose):
    dashboard = compose["services"]["optuna-dashboard"]
    args = command(dashboard)
    assert args[0] == "optuna-dashboard"
    assert args[1] == flag(command(compose["services"]["worker"]), "--storage")
    assert flag(args, "--host") == "0.0.0.0"
    assert dashboard["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in dashboard


def test_worker_command_runs_the_tuner_against_both(compose):
    worker = compose["services"]["worker"]
    args = command(worker)
    env = env_example()
    assert args[0] == "cnn3d-tune"
    storage = flag(args, "--storage")
    assert storage.startswith("postgresql+psycopg://") and "@postgres:5432/" in storage
    assert storage.endswith("/" + env["OPTUNA_DB"])
    assert flag(args, "--tracking-uri") == "http://mlflow:5000"
    assert "--no-report" in args
    # scalable: nothing that pins one container
    assert "container_name" not in worker and not worker.get("ports")
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker["depends_on"]["optuna-dashboard"]["condition"] == "service_healthy"
    assert worker["environment"]["HF_HUB_OFFLINE"] == "1"
    assert "data.cache_dir=/cache" in args and "embeddings:/cache" in worker["volumes"]


def test_worker_command_is_accepted_by_cnn3d_tune(compose, monkeypatch):
    """``cnn3d-tune``'s own CLI parses the worker's flags, and the study spec it names is valid."""
    from tuner.cli import _spec_from_cli, tune_cli

    args = command(compose["services"]["worker"])
    monkeypatch.chdir(ROOT)  # the image's working directory holds studies/ like the repo root
    ctx = tune_cli.make_context("cnn3d-tune", args[1:])
    p = ctx.params
    spec = _spec_from_cli(p["spec_path"], p["name"], p["preset"], p["params"], p["assignments"], p["objectives"],
                          p["sampler"], p["pruner"], p["trials"], p["timeout"], p["workers"], p["seeds"],
                          p["storage"], p["tracking_uri"], p["report"])
    assert spec.storage == flag(args, "--storage") and spec.tracking_uri == "http://mlflow:5000"
    assert spec.report is False and spec.workers == 1, "one process per container: scale with --scale worker=N"


def test_services_built_from_the_project_image(compose):
    for name in ("mlflow", "optuna-dashboard", "worker"):
        service = compose["services"][name]
        assert service["build"]["context"] == "."
        assert service["image"] == "cnn3d:cpu"


def test_env_example_defines_every_variable(raw):
    text = COMPOSE.read_text()
    missing = referenced_variables(text) - set(env_example())
    assert not missing, f".env.example lacks {sorted(missing)}"
    assert "change-me" not in text, "credentials belong in .env, not in the compose file"
    interpolate(text, env_example())  # no required variable left unset


def test_required_credentials_fail_loudly_without_env():
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(COMPOSE.read_text(), {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"})


def test_env_file_is_never_committed_or_sent_to_builds():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and ".git" in ignored
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".env" in gitignore, "add .env to .gitignore (the compose credentials live there)"


# --------------------------------------------------------------------------- the image


def test_dockerfile_pins_cpu_torch_and_installs_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert "constraints.txt" in text and re.search(r'pip install -c \S+ "\.\[dashboard\]"', text)
    for folder in ("cnn3d", "tuner", "studies"):
        assert re.search(rf"^COPY .*\b{folder} \./{folder}$", text, re.M), folder
    assert "whl/cu" in text, "the header shows how to build a CUDA image"
    assert re.search(r"^USER \w+", text, re.M), "the image runs as a non-root user"
    assert re.search(r"apt-get install .*\bgcc\b", text), "a C compiler, for the lattice step's CPU kernels"


# --------------------------------------------------------------------------- the MLflow command, natively


@pytest.mark.slow
def test_mlflow_allowed_hosts_admit_the_service_name(compose, postgres, processes, tmp_path):
    """The compose file's ``--allowed-hosts``, on a real server: ``mlflow:5000`` in, foreign hosts out."""
    allowed = flag(command(compose["services"]["mlflow"]), "--allowed-hosts")
    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir()
    server = start_mlflow_server(processes, postgres.create("hosts"), artifacts, name="mlflow-hosts",
                                 extra=["--allowed-hosts", allowed])
    try:
        api = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api, "mlflow:5000") == 200
        assert http_status(api, server.url.removeprefix("http://")) == 200
        assert http_status(api, "evil.example:5000") == 403
    finally:
        processes.stop(server.process, timeout=3.0)


def http_status(url: str, host: str) -> int:
    """Status of a GET sent with the given Host header."""
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
