"""``lookalike``: run the system locally, publish a catalog, search a photo.

Heavy modules (torch, faiss) are never imported here: the Procfile processes do that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Lookalike: visual product search, event-driven.", no_args_is_help=True)
console = Console()

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "sample"
DEFAULT_URL = "http://127.0.0.1:8000"


@contextlib.contextmanager
def running_system(state_dir: Path, processes: list[str]) -> Iterator[dict[str, str]]:
    """Start the local stack (services not configured by LOOKALIKE_* URLs), run the release step,
    then the Procfile processes under honcho; stop all of it on exit. Yields the environment."""
    from ops.release import release
    from ops.stack import LocalStack
    from schemas.settings import Settings

    signal.signal(signal.SIGTERM, _interrupt)  # so a `kill` stops what was started, like Ctrl-C
    with LocalStack(state_dir) as stack:
        for name, url in stack.urls.items():
            how = "started" if name in stack.started else "configured"
            console.print(f"[bold]{name}[/] {how}: {url}")
        env = {**os.environ, **stack.environ(),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        os.environ.update(stack.environ())
        console.print("release: migrations and topics")
        release(Settings())
        honcho = subprocess.Popen([str(Path(sys.executable).parent / "honcho"), "start", "-f", str(ROOT / "Procfile"),
                                   "-d", str(ROOT), *processes], env=env, start_new_session=True)
        try:
            yield env
        finally:
            if honcho.poll() is None:
                os.killpg(honcho.pid, signal.SIGTERM)
                try:
                    honcho.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(honcho.pid, signal.SIGKILL)
                    honcho.wait()


def wait_ready(url: str, timeout_s: float = 180) -> None:
    """Poll ``GET /readyz`` until 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise typer.Exit(_fail(f"the gateway at {url} was not ready within {timeout_s:.0f} s: {last}"))


def wait_searchable(product_ids: list[int], timeout_s: float = 600) -> None:
    """Show progress until every product has a vector in Postgres and every live worker's replica
    holds every live vector."""
    import redis
    import sqlalchemy as sa

    from schemas.jobs import JobStore
    from schemas.settings import WorkerSettings
    from workers import catalog

    settings = WorkerSettings()
    engine = sa.create_engine(settings.database_url)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("searchable on every worker", total=len(product_ids))
            while time.monotonic() < deadline:
                stored = catalog.count_vectors(engine, settings.model_version, product_ids)
                live = catalog.count_vectors(engine, settings.model_version)
                replicas = store.replicas()
                behind = max((live - r.ntotal for r in replicas), default=live)
                progress.update(bar, completed=max(0, min(stored, len(product_ids) - behind)),
                                description=f"searchable on {len(replicas)} worker(s)")
                if stored == len(product_ids) and replicas and behind <= 0:
                    return
                time.sleep(0.25)
    finally:
        engine.dispose()
    raise typer.Exit(_fail(f"not every product was searchable within {timeout_s:.0f} s; "
                           "look for dead letters on catalog.products.dlq and at the indexer's log"))


def submit_search(url: str, photo: Path, k: int, timeout_s: float = 120) -> dict:
    """POST the photo as a job, then poll its status until done or failed. Returns the final status."""
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/v1/jobs", files={"image": (photo.name, photo.read_bytes())}, data={"k": str(k)})
        if response.status_code != 202:
            raise typer.Exit(_fail(f"submit refused ({response.status_code}): {response.text}"))
        status_url = response.json()["status_url"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get(status_url).json()
            if status["status"] in ("done", "failed"):
                return status
            time.sleep(0.1)
    raise typer.Exit(_fail(f"job {status_url} did not finish within {timeout_s:.0f} s"))


def print_result(status: dict, title: str) -> None:
    if status["status"] == "failed":
        raise typer.Exit(_fail(f"job failed: {status['error']['code']}: {status['error']['message']}"))
    table = Table(title=title)
    for column in ("rank", "product id", "score", "title", "articleType"):
        table.add_column(column)
    for rank, hit in enumerate(status["result"]["products"], 1):
        table.add_row(str(rank), str(hit["product_id"]), f"{hit['score']:.3f}", hit["title"] or "",
                      hit["article_type"] or "")
    console.print(table)
    timings = ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in status["timings"].items())
    console.print(f"model {status['result']['model_version']}; {timings}")


def _fail(message: str) -> int:
    console.print(f"[red]error:[/] {message}")
    return 1


@app.command()
def up(state_dir: Path = typer.Option(Path(".lookalike"), help="Data, sockets and logs of started services."),
       processes: str = typer.Option("web,worker,indexer", help="Procfile processes to run.")) -> None:
    """Start the local stack and the Procfile processes; Ctrl-C stops everything."""
    with running_system(state_dir, processes.split(",")):
        _serve_until_interrupted()


@app.command("release")
def release_command() -> None:
    """Wait for Postgres, migrate to head, create the Kafka topics."""
    from ops.release import main

    main()


@app.command("publish")
def publish_command(catalog: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV like styles.csv."),
                    images: Path = typer.Option(..., exists=True, file_okay=False, help="Directory of <id>.jpg."),
                    version: int = typer.Option(None, help="Event version (default: now, in ms)."),
                    wait: bool = typer.Option(False, help="Wait until every product is searchable.")) -> None:
    """Publish one catalog event per CSV row to Kafka; rows that cannot be published are listed."""
    from ops.publish import publish, read_catalog
    from schemas.settings import Settings

    settings = Settings()
    events, errors = read_catalog(catalog, images, version)
    columns = (TextColumn("publishing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("publish", total=len(events))
        sent = publish(settings.kafka_bootstrap, settings.products_topic, events, lambda: progress.advance(bar))
    console.print(f"published {sent} products to {settings.products_topic} at {settings.kafka_bootstrap}")
    for error in errors:
        console.print(f"[yellow]line {error.line}[/] (id {error.product_id!r}): {error.reason}")
    if wait:
        wait_searchable([e.product_id for e in events])
    if errors:
        raise typer.Exit(_fail(f"{len(errors)} row(s) not published, listed above"))


@app.command()
def search(photo: Path = typer.Argument(..., exists=True, dir_okay=False),
           k: int = typer.Option(5, "-k", min=1, max=100, help="How many products."),
           url: str = typer.Option(DEFAULT_URL, envvar="LOOKALIKE_URL", help="The gateway.")) -> None:
    """Submit a photo as a search job, poll it, print the products."""
    print_result(submit_search(url, photo, k), f"top {k} for {photo.name}")


dlq_app = typer.Typer(help="Dead letters: catalog events that could not be applied.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(limit: int = typer.Option(100, help="Show at most this many (oldest first).")) -> None:
    """List dead letters: where each event came from and why it was refused."""
    from ops import dlq
    from schemas.settings import Settings

    table = Table(title=f"dead letters ({Settings().dlq_topic})")
    for column in ("dlq offset", "source", "key", "reason"):
        table.add_column(column)
    count = 0
    for offset, letter in dlq.read(Settings()):
        count += 1
        if count <= limit:
            table.add_row(str(offset), f"{letter.topic}[{letter.partition}]@{letter.offset}", letter.key or "",
                          letter.reason)
    console.print(table)
    console.print(f"{count} dead letter(s)" + (f", first {limit} shown" if count > limit else ""))


@dlq_app.command("replay")
def dlq_replay(offsets: list[int] = typer.Argument(None, help="DLQ offsets to replay (default: all)."),
               yes: bool = typer.Option(False, "--yes", help="Replay all without asking.")) -> None:
    """Publish dead letters' original events again (after fixing what refused them)."""
    from ops import dlq
    from schemas.settings import Settings

    if not offsets and not yes:
        typer.confirm("Replay every dead letter?", abort=True)
    sent = dlq.replay(Settings(), set(offsets) if offsets else None)
    console.print(f"re-published {sent} event(s)")


@app.command()
def demo(state_dir: Path = typer.Option(Path(".lookalike"), help="Data, sockets and logs of started services."),
         query: Path = typer.Option(SAMPLE / "queries" / "17423.jpg", exists=True, help="Photo to search.")) -> None:
    """The whole path on the bundled sample: stack up, catalog in, one search out, then keep serving."""
    from ops.publish import publish, read_catalog
    from schemas.settings import Settings

    port = os.environ.get("LOOKALIKE_PORT", "8000")
    url = f"http://127.0.0.1:{port}"
    with running_system(state_dir, ["web", "worker", "indexer"]):
        wait_ready(url)
        settings = Settings()
        events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images")
        if errors:
            raise typer.Exit(_fail(f"the bundled sample has {len(errors)} bad rows: {errors[:3]}"))
        with console.status(f"publishing {len(events)} sample products"):
            publish(settings.kafka_bootstrap, settings.products_topic, events)
        wait_searchable([e.product_id for e in events])
        label = _query_label(query)
        print_result(submit_search(url, query, 5), f"top 5 for {query.name} ({label})")
        console.print(f"\nThe gateway is serving on {url} (try `lookalike search PHOTO`); Ctrl-C stops everything.")
        _serve_until_interrupted()


def _query_label(photo: Path) -> str:
    import csv

    with open(SAMPLE / "queries.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["id"] == photo.stem:
                return f"{row['productDisplayName']}, {row['articleType']}"
    return "not in the sample"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve_until_interrupted() -> None:
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping")


if __name__ == "__main__":
    app()
