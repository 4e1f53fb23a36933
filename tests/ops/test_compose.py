"""docker-compose.yml, ops/Dockerfile, ops/prometheus*.yml and Grafana's provisioning, checked
without a Docker engine.

The YAML is parsed as written (before compose interpolates ``${...}``), so a literal secret
shows up as itself. ``docker compose config`` (or ``docker-compose config``) runs too where
one is installed; it needs no engine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "ops" / "prometheus.yml"
PROMETHEUS_LOCAL = ROOT / "ops" / "prometheus.local.yml"
GRAFANA = ROOT / "ops" / "grafana"
METRICS_PORT = "9100"  # LOOKALIKE_METRICS_PORT of workers and indexers in compose
DOCKERFILE = ROOT / "ops" / "Dockerfile"

APP_IMAGE = "lookalike:latest"
APP_URLS = {  # variable -> the compose service its URL must point at
    "LOOKALIKE_DATABASE_URL": "postgres",
    "LOOKALIKE_REDIS_URL": "redis",
    "LOOKALIKE_KAFKA_BOOTSTRAP": "kafka",
}
# Services without a healthcheck, and why. Every other service must have one.
NO_HEALTHCHECK = {
    "release": "one-shot: others wait for it to exit 0 (service_completed_successfully)",
}
CONDITIONS = {"service_healthy", "service_completed_successfully", "service_started"}
SECRET_REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}$")  # ${VAR:?message}: required, no default
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def app_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: svc for name, svc in services.items() if svc.get("image") == APP_IMAGE or "build" in svc}


def strings(node, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string value in a parsed YAML tree, with its path (``KEY=value`` list items split)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", value):
                key, value = value.split("=", 1)
                yield f"{path}.{key}", value
            else:
                yield from strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin), else ``docker-compose``, else None."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            continue
        try:
            done = subprocess.run([*cli, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cli
    return None


COMPOSE_CLI = compose_cli()


@pytest.mark.skipif(COMPOSE_CLI is None, reason="neither `docker compose` nor `docker-compose` here")
def test_docker_compose_config_accepts_the_file_and_refuses_a_missing_password():
    command = [*COMPOSE_CLI, "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"]
    env = {key: os.environ[key] for key in ("PATH", "HOME", "DOCKER_HOST") if key in os.environ}
    secrets = {"POSTGRES_PASSWORD": "compose-test-only", "GRAFANA_ADMIN_PASSWORD": "compose-test-only"}
    ok = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**env, **secrets})
    assert ok.returncode == 0, ok.stderr
    for missing in secrets:
        others = {key: value for key, value in secrets.items() if key != missing}
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, env={**env, **others})
        assert refused.returncode != 0
        assert f"set {missing}" in refused.stderr


def test_app_services_share_the_image_and_have_the_three_urls(services):
    apps = app_services(services)
    assert set(apps) == {"release", "web", "worker", "worker-gpu", "indexer"}
    for name, svc in apps.items():
        assert svc.get("image") == APP_IMAGE, name
        assert svc["build"] == {"context": ".", "dockerfile": "ops/Dockerfile"}, name
        env = env_of(svc)
        for var, host in APP_URLS.items():
            assert var in env, f"{name} lacks {var}"
            value = env[var] if "://" in env[var] else f"tcp://{env[var]}"
            assert urlsplit(value).hostname == host, f"{name}: {var}={env[var]} should point at {host}"
            assert host in services, f"{var} points at {host}, which is no service"
    assert (ROOT / apps["web"]["build"]["dockerfile"]).is_file()


def test_depends_on_names_real_services_with_conditions_that_can_be_met(services):
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must be the long form with a condition"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on {target}, which is no service"
            assert target != name
            condition = (spec or {}).get("condition")
            assert condition in CONDITIONS, f"{name} -> {target}: condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must run once (restart: \"no\")"
                assert "profiles" not in services[target], f"{target} must run in every profile"


def test_every_long_running_service_has_a_healthcheck(services):
    assert set(NO_HEALTHCHECK) <= set(services), "NO_HEALTHCHECK names a service that is gone"
    for name, svc in services.items():
        if name in NO_HEALTHCHECK:
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck ({sorted(NO_HEALTHCHECK)} may go without)"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_no_password_is_written_in_the_file(compose):
    for where, text in strings(compose):
        if "PASSWORD" in where.rsplit(".", 1)[-1].upper() and not where.endswith("PASSWORD_FILE"):
            assert SECRET_REF.match(text), f"{where} = {text!r} must be a ${{VAR:?message}} reference"
        for password in URL_PASSWORD.findall(text):
            assert SECRET_REF.match(password), f"{where} has a password in a URL: {password!r}"
    raw = COMPOSE.read_text()
    for secret in ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert "${%s:?" % secret in raw
        assert not re.search(rf"{secret}:-", raw), "a default would be a password in the file"


def test_procfile_processes_run_in_compose_with_the_same_commands(services):
    procfile = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            procfile[name.strip()] = command.strip()
    assert set(procfile) == {"release", "web", "worker", "indexer"}
    compose_of = {"worker": ["worker", "worker-gpu"]}
    for process, command in procfile.items():
        words = shlex.split(command)
        while "=" in words[0]:  # VAR=value before the program (the metrics port): compose sets env instead
            words.pop(0)
        # honcho runs each line in `sh -c` and reports that shell's exit status (-15 after SIGTERM
        # however the program ended) unless the shell is replaced by the program
        assert words.pop(0) == "exec", f"{process}: {command!r} does not exec its program"
        prefix = words[:4]  # program and module, before host/port/concurrency
        for name in compose_of.get(process, [process]):
            assert name in services, f"Procfile process {process} has no compose service {name}"
            got = services[name]["command"]
            got = shlex.split(got) if isinstance(got, str) else got
            assert got[:len(prefix)] == prefix, f"{name}: {got} does not run Procfile's {command!r}"
    web = shlex.split(services["web"]["command"])
    assert web[web.index("--host") + 1] == "0.0.0.0"
    assert "8000:8000" in [str(port) for port in services["web"]["ports"]]


def test_the_web_takes_api_key_digests_from_the_environment_and_is_read_only_without(services):
    value = env_of(services["web"])["LOOKALIKE_API_KEY_SHA256"]
    assert value == "${LOOKALIKE_API_KEY_SHA256:-[]}"  # never a digest written in the file
    assert "LOOKALIKE_DATABASE_URL" in env_of(services["web"])  # the shared URLs are kept


def test_the_default_worker_runs_without_a_gpu_and_worker_gpu_reserves_one(services):
    cpu, gpu = services["worker"], services["worker-gpu"]
    assert "profiles" not in cpu and "deploy" not in cpu
    assert env_of(cpu)["LOOKALIKE_DEVICE"] == "cpu"
    assert gpu["profiles"] == ["gpu"]
    assert env_of(gpu)["LOOKALIKE_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "-Q vision" in cpu["command"] and cpu["command"] == gpu["command"]


def test_prometheus_finds_every_replica_of_every_process_in_compose(services):
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {"lookalike-web": (["web"], "8000"), "lookalike-worker": (["worker", "worker-gpu"], METRICS_PORT),
                "lookalike-indexer": (["indexer"], METRICS_PORT)}
    assert set(jobs) == set(expected)
    for name, (hosts, port) in expected.items():
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        (sd,) = jobs[name]["dns_sd_configs"]  # DNS, so that `--scale` gives one target per replica
        assert sd["names"] == hosts and sd["type"] == "A" and str(sd["port"]) == port, name
        for host in hosts:
            env = env_of(services[host])
            if host != "web":
                assert env["LOOKALIKE_METRICS_PORT"] == port and env["LOOKALIKE_METRICS_HOST"] == "0.0.0.0", host
    web = shlex.split(services["web"]["command"])
    assert web[web.index("--port") + 1] == "8000"
    assert config["rule_files"] == ["alerts.yml"]
    volumes = services["prometheus"]["volumes"]
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./ops/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes  # beside it: rule_files is relative


def test_the_local_prometheus_config_scrapes_honchos_ports():
    """`honcho start web worker indexer` gives the n-th process PORT 5000 + 100 n; the Procfile
    hands it to the worker and the indexer as their metrics port."""
    procfile = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    for process in ("worker", "indexer"):
        assert procfile[process].strip().startswith("LOOKALIKE_METRICS_PORT=${PORT:-0} "), process
    config = yaml.safe_load(PROMETHEUS_LOCAL.read_text())
    targets = {job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
               for job in config["scrape_configs"]}
    assert targets == {"lookalike-web": ["127.0.0.1:8000"], "lookalike-worker": ["127.0.0.1:5100"],
                       "lookalike-indexer": ["127.0.0.1:5200"]}
    assert config["rule_files"] == ["alerts.yml"]
    assert "honcho start web worker indexer" in PROMETHEUS_LOCAL.read_text()


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard_for_anonymous_viewers(services):
    grafana = services["grafana"]
    env = env_of(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert SECRET_REF.match(env["GF_SECURITY_ADMIN_PASSWORD"])
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
        if source.startswith("./"):
            assert (ROOT / source).is_dir(), f"grafana mounts {source}, which is not in the repository"
    assert mounts["/etc/grafana/provisioning"] == "./ops/grafana/provisioning"

    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert f"{url.port}:{url.port}" in services["prometheus"]["ports"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "lookalike.yml").read_text())["providers"]
    dashboards = provider["options"]["path"]
    assert mounts[dashboards] == "./ops/grafana/dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/") and (GRAFANA / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    assert "3000:3000" in grafana["ports"]


def test_dockerfile_copies_every_package_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for package in re.findall(r'"(\w+)\*"', include):
        assert re.search(rf"^COPY {package}/ {package}/$", text, re.M), f"ops/Dockerfile does not copy {package}/"
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^RUN pip install '\.\[vision\]'$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
