"""The embedded stack `make demo` uses on a machine with no services of its own."""

import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
import redis
from kafka.errors import KafkaError
import sqlalchemy as sa

from ops.release import release
from ops.stack import JEMALLOC_CONF, LocalStack, jemalloc_env, kafka_ready
from schemas.settings import Settings


@pytest.fixture
def state_dir():
    """A state directory PostgreSQL can reach when it runs as `nobody` (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lookalike-stack-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_stack_starts_answers_takes_the_release_and_stops(state_dir):
    with LocalStack(state_dir, env={}) as stack:
        assert stack.started == ["postgres", "redis", "kafka"]
        settings = Settings(database_url=stack.urls["postgres"], redis_url=stack.urls["redis"],
                            kafka_bootstrap=stack.urls["kafka"])
        assert redis.Redis.from_url(settings.redis_url).ping()
        release(settings)
        engine = sa.create_engine(settings.database_url)
        with engine.connect() as conn:
            tables = set(conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname='public'")).scalars())
        engine.dispose()
        assert {"products", "product_vectors", "alembic_version"} <= tables
        port = int(stack.urls["kafka"].rsplit(":", 1)[1])
    assert stack.started == []
    with pytest.raises(KafkaError):
        kafka_ready(f"127.0.0.1:{port}")
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()


def test_configured_services_are_used_not_started(tmp_path, stack):
    with LocalStack(tmp_path, env=stack) as local:
        assert local.started == []
        assert local.environ() == stack


def test_a_stale_postmaster_is_stopped_before_starting(state_dir):
    first = LocalStack(state_dir, env={}, services=("postgres",))
    first.start()
    first._procs.clear()  # forget the server, as a killed launcher would
    first.started.clear()
    with LocalStack(state_dir, env={}, services=("postgres",)) as second:
        url = second.urls["postgres"].replace("+psycopg2", "")
        psycopg2.connect(url).close()


def test_jemalloc_is_preloaded_when_installed_unless_the_operator_chose(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    assert jemalloc_env({}) == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF}
    assert jemalloc_env({"MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] == "narenas:2"
    assert jemalloc_env({"LD_PRELOAD": "libtcmalloc.so.4"}) == {}
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert jemalloc_env({}) == {}


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None, reason="jemalloc not installed (Debian: libjemalloc2)")
def test_a_process_started_with_it_allocates_with_jemalloc():
    env = jemalloc_env({})
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True)
    assert "libjemalloc" in maps.stdout and not maps.stderr, maps.stderr


RERUN = """
import sys
sys.path.insert(0, {root!r})
from ops.stack import rerun_with_jemalloc
print("started", flush=True)
rerun_with_jemalloc(sys.argv)
print("jemalloc" if "libjemalloc" in open("/proc/self/maps").read() else "glibc", *sys.argv[1:])
"""


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None, reason="jemalloc not installed (Debian: libjemalloc2)")
def test_a_program_reruns_itself_with_jemalloc_once_unless_ld_preload_is_set(tmp_path):
    program = tmp_path / "program.py"
    program.write_text(RERUN.format(root=str(Path(__file__).resolve().parents[2])))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    again = subprocess.run([sys.executable, str(program), "embed", "--reps", "3"], env=env,
                           capture_output=True, text=True, check=True, timeout=60)
    assert again.stdout.split("\n") == ["started", "started", "jemalloc embed --reps 3", ""], again.stderr
    kept = subprocess.run([sys.executable, str(program), "embed"], env={**env, "LD_PRELOAD": ""},
                          capture_output=True, text=True, check=True, timeout=60)
    assert kept.stdout.split("\n") == ["started", "glibc embed", ""], kept.stderr
