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
    from ops.stack import LocalStack, jemalloc_env
    from schemas.settings import Settings

    signal.signal(signal.SIGTERM, _interrupt)  # so a `kill` stops what was started, like Ctrl-C
    with LocalStack(state_dir) as stack:
        for name, url in stack.urls.items():
            how = "started" if name in stack.started else "configured"
            console.print(f"[bold]{name}[/] {how}: {url}")
        os.environ.update(stack.environ())
        os.environ.setdefault("LOOKALIKE_SNAPSHOT_DIR", str(stack.state_dir / "snapshots"))
        env = {**os.environ, **jemalloc_env(),  # the Procfile's processes' allocator, when installed
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        console.print("[bold]allocator[/]: " + (env.get("LD_PRELOAD") or "glibc's malloc; jemalloc (Debian: "
                                                "libjemalloc2) is faster, see the README's Allocator"))
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


def wait_searchable(product_ids: list[int], stall_timeout_s: float = 180) -> None:
    """Show progress until every product has a vector in Postgres and every live worker's replica
    holds every live vector; give up only after ``stall_timeout_s`` seconds without progress (a
    slow machine just takes longer; a stuck indexer or a dead-lettered catalog does not move)."""
    import redis
    import sqlalchemy as sa

    from schemas.jobs import JobStore
    from schemas.settings import WorkerSettings
    from workers import catalog

    settings = WorkerSettings()
    engine = sa.create_engine(settings.database_url)
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    done, moved_at = None, time.monotonic()
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("searchable on every worker", total=len(product_ids))
            while time.monotonic() - moved_at < stall_timeout_s:
                stored = catalog.count_vectors(engine, settings.model_version, product_ids)
                live = catalog.count_vectors(engine, settings.model_version)
                replicas = store.replicas()
                behind = max((live - r.ntotal for r in replicas), default=live)
                searchable = max(0, min(stored, len(product_ids) - behind))
                progress.update(bar, completed=searchable, description=f"searchable on {len(replicas)} worker(s)")
                if stored == len(product_ids) and replicas and behind <= 0:
                    return
                if (stored, searchable) != done:
                    done, moved_at = (stored, searchable), time.monotonic()
                time.sleep(0.25)
    finally:
        engine.dispose()
    raise typer.Exit(_fail(f"nothing became searchable for {stall_timeout_s:.0f} s; look for dead letters "
                           "(`lookalike dlq list`) and at the indexer's and worker's logs"))


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


@app.command("segment-sheet")
def segment_sheet(images: Path = typer.Option(SAMPLE / "images", exists=True, file_okay=False,
                                              help="Folder of photos (.jpg, .png, .webp)."),
                  out: Path = typer.Option(Path("segment-sheet.png"), help="Contact sheet to write (PNG)."),
                  n: int = typer.Option(24, "--n", min=1, max=400, help="How many photos, evenly spaced by name."),
                  tile: int = typer.Option(160, min=32, max=1024, help="Side of one tile in pixels."),
                  colours: int = typer.Option(0, min=0, max=256, help="Quantise to N colours (0: no).")) -> None:
    """Save a contact sheet of photos with their segmentation: background tinted, box green (red: fallback).
    Photos are decoded as the worker decodes them (reduced when large); one that cannot be read is left
    out with a warning."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, ImageDraw

    from workers.decode import decode_reduced
    from workers.embed import DECODE_MIN_PX
    from workers.segment import Segmenter, overlay
    from workers.train import MAX_PIXELS, SUFFIXES, read_photos

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if out.suffix.lower() != ".png" or out.is_dir():
        raise typer.Exit(_fail(f"--out {out}: give a file name ending in .png"))
    files = sorted(f for f in images.iterdir() if f.suffix.lower() in SUFFIXES)
    files = [files[i * len(files) // n] for i in range(min(n, len(files)))]  # evenly spaced, first to last
    with ThreadPoolExecutor(2) as pool:
        files, pixels = read_photos(files, lambda data: decode_reduced(data, MAX_PIXELS, DECODE_MIN_PX).pixels,
                                    pool)
    if not files:
        raise typer.Exit(_fail(f"no photo (.jpg, .jpeg, .png, .webp) could be read in {images}"))
    columns = min(len(files), 6)
    sheet = Image.new("RGB", (columns * tile, -(-len(files) // columns) * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    segments = Segmenter().segment(pixels)
    for i, (f, image, seg) in enumerate(zip(files, pixels, segments)):
        shown = Image.fromarray(overlay(image, seg))
        shown.thumbnail((tile - 4, tile - 4))
        x, y = (i % columns) * tile, (i // columns) * (tile + 14)
        sheet.paste(shown, (x + (tile - shown.width) // 2, y + 2))
        draw.text((x + 4, y + tile), f"{f.stem} fg {seg.foreground:.2f} border {seg.border_uniformity:.2f}",
                  fill=(0, 0, 0))
    if colours:
        sheet = sheet.quantize(colours)
    try:
        sheet.save(out, optimize=True)
    except OSError as exc:
        raise typer.Exit(_fail(f"--out {out} cannot be written: {exc.strerror or exc}")) from None
    console.print(f"{out}: {len(files)} photos, {sum(not s.confident for s in segments)} left whole (not confident)")


@app.command()
def reindex(model_version: str = typer.Option(None, help=(
        "Re-embed every live product for this model version (from the stored thumbnails) before "
        "rebuilding its shards; default: rebuild the current version's shards, embedding nothing."))) -> None:
    """Rebuild every shard from the vectors in Postgres and write fresh snapshots (see workers/reindex.py)."""
    import sqlalchemy as sa

    from schemas.settings import ModelSettings
    from workers import reindex as reindexing

    settings = ModelSettings()
    engine = sa.create_engine(settings.database_url)
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        def bar(total: int):
            task = progress.add_task("embed", total=total)
            return lambda n: progress.advance(task, n)

        try:
            report = reindexing.run(settings, engine, model_version, bar)
        except ValueError as exc:
            raise typer.Exit(_fail(str(exc))) from None
        finally:
            engine.dispose()
    console.print(f"{report.model_version}: {report.embedded} product(s) embedded; shards "
                  + ", ".join(f"{p}: {n}" for p, n in sorted(report.shard_sizes.items()))
                  + f"; snapshots in {settings.snapshot_dir}")


bench_app = typer.Typer(help="Benchmarks (figures for the README, not tests).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("ingest")
def bench_ingest(n: int = typer.Option(5000, "--n", min=1, help="Products published at once."),
                 trickle: int = typer.Option(100, help="Products then published one by one, for freshness."),
                 rate: float = typer.Option(10.0, help="Trickle rate, products/s."),
                 state_dir: Path = typer.Option(Path(".lookalike/bench-ingest"),
                                                help="The bench's own services' state; wiped at start.")
                 ) -> None:
    """Ingest rate end to end vs embedding alone, freshness p50/p95/p99, shard vs raw FAISS, memory."""
    from ops.bench import ingest

    figures = ingest(n, trickle, rate, state_dir, console)
    table = Table(title="lookalike bench ingest")
    table.add_column("measure")
    table.add_column("value")
    for row in figures.rows():
        table.add_row(*row)
    console.print(table)


@app.command()
def train(images: list[Path] = typer.Option(..., exists=True, file_okay=False, help=(
              "Folder of <id>.<jpg|jpeg|png|webp> photos; repeat to pool several (e.g. 224 and 60x80). Folders "
              "are told apart by name (their --cache folder and their figures in metrics.json), so two may not "
              "share one: rename one.")),
          styles: Path = typer.Option(..., exists=True, dir_okay=False, help="styles.csv (labels by id)."),
          out: Path = typer.Option(..., help="Folder (created) to write heads.safetensors, labels.json, config.json "
                                             "and metrics.json to."),
          cache: Path = typer.Option(Path(".lookalike/features"),
                                     help="Feature cache: a folder per --images, named <its name>[-segmented]."),
          hidden: int = typer.Option(1024, min=0, help="Shared hidden layer width (0: linear heads)."),
          min_count: int = typer.Option(10, min=1, help="Labels with fewer training photos fold into 'other'."),
          device: str = typer.Option("auto", help="Backbone device: auto, cpu, cuda."),
          segment: bool = typer.Option(True, help="Crop to the product first, as workers with LOOKALIKE_SEGMENT do.")
          ) -> None:
    """Train the category heads on a catalog's photos; products with id % 10 == 0 are held out for
    validation, id % 10 == 1 for early stopping. styles.csv, the photo folders, the splits and --out
    are checked before any photo is embedded; a photo that cannot be read is left out with a warning
    (n_skipped in metrics.json)."""
    import json
    import logging

    from schemas.settings import ModelSettings
    from workers.embed import Embedder
    from workers.errors import InvalidInput
    from workers.segment import Segmenter, segmented
    from workers.train import check_split, extract_features, photos, read_styles, train as train_heads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [d.resolve().name for d in images]
    if len(set(names)) < len(names):
        twins = ", ".join(str(d) for d, name in zip(images, names) if names.count(name) > 1)
        raise typer.Exit(_fail(f"--images {twins}: folders of one name, which keys their feature cache and their "
                               "figures in metrics.json; rename one of them"))
    try:
        labels = read_styles(styles)
        folders = {name: photos(d, labels) for name, d in zip(names, images)}
        check_split([int(p.stem) for paths in folders.values() for p in paths], labels)
        _writable_folder(out)
        embedder = Embedder.from_settings(ModelSettings(), "train", device)
        embed = segmented(embedder.embed, Segmenter(embedder.device) if segment else None)
        suffix = "-segmented" if segment else ""
        sources = {name: extract_features(paths, cache / f"{name}{suffix}", embed)
                   for name, paths in folders.items()}
        skipped = sum(len(folders[name]) - len(ids) for name, (ids, _) in sources.items())
        metrics = train_heads(sources, labels, out, hidden=hidden, min_count=min_count, segmented=segment,
                              n_skipped=skipped)
    except InvalidInput as exc:
        raise typer.Exit(_fail(exc.message)) from None
    console.print_json(json.dumps(metrics["validation"]))
    if skipped:
        console.print(f"[yellow]{skipped} photo(s) could not be read and were left out[/] (warnings above)")


def _writable_folder(out: Path) -> None:
    """Create ``out`` (and its parents), or exit saying why it cannot be written to."""
    if out.exists() and not out.is_dir():
        raise typer.Exit(_fail(f"--out {out} is a file: give a folder (it is created if missing)"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.Exit(_fail(f"--out {out} cannot be created: {exc.strerror}")) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise typer.Exit(_fail(f"--out {out} is not writable: give a folder you can write to"))


@app.command("eval")
def eval_command(catalog_images: Path = typer.Option(..., exists=True, file_okay=False,
                                                     help="Folder of catalog photos, <id>.<jpg|jpeg|png|webp>."),
                 styles: Path = typer.Option(..., exists=True, dir_okay=False, help="Labels of catalog and queries."),
                 queries: Path = typer.Option(..., exists=True, file_okay=False, help=(
                     "Folder of query photos, <id>.<jpg|jpeg|png|webp>. A query whose id is in the catalog should "
                     "be another photo of that product: the very same file finds itself first (warned).")),
                 k: int = typer.Option(5, "--k", "-k", min=1, max=100, help=(
                     "Results per query. precision@k counts each result with the query's label, the query's own "
                     "product included.")),
                 heads: Path = typer.Option(None, exists=True, file_okay=False,
                                            help="Heads: a folder `lookalike train --out` wrote (default: shipped)."),
                 cache: Path = typer.Option(None, file_okay=False,
                                            help="Catalog features from `lookalike train --cache`: the catalog "
                                                 "folder's own subfolder (e.g. .lookalike/features/i224-segmented)."),
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
                 segment: bool = typer.Option(True, help="Crop to the product first, as workers with "
                                                         "LOOKALIKE_SEGMENT do (and as the --cache was made)."),
                 votes: bool = typer.Option(True, help="Blend the heads with the catalog neighbours' labels, as "
                                                       "workers with LOOKALIKE_CATEGORY_VOTES do.")
                 ) -> None:
    """Search every query photo in an in-memory index of the catalog photos; print precision@k,
    exact-product recall, the category accuracy (with the catalog's votes and of the heads alone)
    and images/s.

    precision@k is the mean fraction of a query's top k with its label, the query's own product
    included when the catalog holds it: another photo of the same product is a right answer. A query
    that is the very catalog file (--queries the catalog folder) finds itself first; a warning says so.
    styles.csv and the folders are checked before any photo is embedded; a photo that cannot be read
    is left out with a warning (n_skipped). Logs go to stderr, so --json prints only the JSON object."""
    import json
    import logging

    from schemas.settings import ModelSettings
    from workers.classify import CategoryHeads
    from workers.embed import Embedder
    from workers.errors import InvalidInput
    from workers.evaluate import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    missing = [name for name in ("heads.safetensors", "labels.json", "config.json")
               if heads and not (heads / name).is_file()]
    if missing:
        raise typer.Exit(_fail(f"--heads {heads} has no {', '.join(missing)}: give a folder that "
                               "`lookalike train --out` wrote"))
    try:
        result = evaluate(catalog_images, styles, queries, k, embedder=Embedder.from_settings(ModelSettings()),
                          heads=CategoryHeads(heads) if heads else None, catalog_cache=cache, segment=segment,
                          votes=votes)
    except InvalidInput as exc:
        raise typer.Exit(_fail(exc.message)) from None
    if as_json:
        print(json.dumps(result))
        return
    table = Table("metric", *result["precision_at_k"], title=f"{result['n_queries']} queries, "
                  f"{result['n_catalog']} catalog photos, k={k}")
    table.add_row(f"precision@{k}", *(_pct(v) for v in result["precision_at_k"].values()))
    table.add_row("category accuracy", *(_pct(v) for v in result["category_accuracy"].values()))
    table.add_row("  heads alone", *(_pct(v) for v in result["category_accuracy_heads"].values()))
    console.print(table)
    console.print(f"exact product: recall@1 {_pct(result['exact_recall_at_1'])}, recall@{k} "
                  f"{_pct(result['exact_recall_at_k'])}; {result['images_per_s']} query images/s")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


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


@bench_app.command("embed")
def bench_embed(state_dir: Path = typer.Option(Path(".lookalike/bench-embed"),
                                               help="The bench's own services' state; wiped at start."),
                job_batch: list[int] = typer.Option([4, 8], min=2,
                                                    help="LOOKALIKE_JOB_BATCH_SIZE of a batching worker (repeatable)."),
                job_wait_ms: float = typer.Option(None, help="LOOKALIKE_JOB_BATCH_WAIT_MS (default: the setting's)."),
                jobs: int = typer.Option(12, min=1, help="Jobs per submitter per round."),
                min_jobs: int = typer.Option(96, min=0, help="Jobs per row per round at least: with fewer "
                                                             "submitters each posts more."),
                rounds: int = typer.Option(3, min=1, help="Rounds, each running every configuration in turn "
                                                         "(median jobs/s, paired ratio to no batching)."),
                reps: int = typer.Option(7, min=1, help="Timings per batch size; the median is shown."),
                catalog_size: int = typer.Option(
                    None, "--catalog", min=0,
                    help="Products searched in the Celery part: the sample, then filler products up to this "
                         "many (default: as many as Fashion Product Images has photos, 44,446; 0: the "
                         "sample alone).")) -> None:
    """Raw model forward vs the whole pipeline at batch 1/8/32 (and 128 on CUDA), and the pipeline's
    stages; large uploads decoded whole and reduced; jobs/s and latency through Celery with and
    without micro-batching at 1, 4 and 16 submitters, over a catalog of Fashion Product Images'
    size. Started again with jemalloc preloaded when it is installed and ``LD_PRELOAD`` is not set,
    as the workers are (``LD_PRELOAD=`` keeps glibc)."""
    import shutil

    from ops.stack import rerun_with_jemalloc

    rerun_with_jemalloc(sys.argv)

    import torch

    from ops import bench_embed as bench
    from ops.bench_scale import machine
    from ops.publish import publish, read_catalog
    from workers import catalog

    batches = [1, 8, 32] + ([128] if torch.cuda.is_available() else [])
    console.print(f"raw forward vs pipeline, batches {batches}, allocator {os.environ.get('LD_PRELOAD') or 'glibc'}")
    device, forward = bench.forward_rows(batches, reps, say=console.print)
    console.print("large uploads, decoded whole and reduced ...")
    uploads = bench.upload_rows(bench.UPLOADS, reps, say=console.print)
    console.print("search per job at catalog scale ...")
    searches = bench.search_rows([1, *job_batch], reps, say=console.print)
    shutil.rmtree(state_dir, ignore_errors=True)
    with running_system(state_dir, ["indexer"]) as env:  # the indexer is idle once the sample is in
        import sqlalchemy as sa

        from schemas.settings import IndexerSettings

        settings = IndexerSettings()
        events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images")
        if errors:
            raise typer.Exit(_fail(f"the bundled sample has {len(errors)} bad rows: {errors[:3]}"))
        console.print(f"indexing the sample catalog ({len(events)} products) for the searches ...")
        publish(settings.kafka_bootstrap, settings.products_topic, events)
        engine = sa.create_engine(settings.database_url)
        while catalog.count_vectors(engine, settings.model_version) < len(events):
            time.sleep(0.5)
        added = bench.fill_catalog(engine, events, settings.model_version, settings.partitions,
                                   bench.CATALOG_VECTORS if catalog_size is None else catalog_size)
        engine.dispose()
        if added:  # the indexer's snapshots lack the filler: the bench's workers load PostgreSQL's rows
            console.print(f"added {added:,} filler products (random vectors) to the catalog")
            env.pop("LOOKALIKE_SNAPSHOT_DIR", None)
        logs = state_dir / "bench-logs"
        logs.mkdir(exist_ok=True)
        console.print("through Celery (a worker, -P threads -c 2, per configuration, taking turns) ...")
        if job_wait_ms is not None:
            env["LOOKALIKE_JOB_BATCH_WAIT_MS"] = str(job_wait_ms)
        rows = bench.celery_rows(env, logs, [1, *job_batch], [1, 4, 16], jobs, rounds, min_jobs=min_jobs,
                                 say=console.print)
    where = f"{machine()}, {device}"
    table = Table(title=f"lookalike bench embed: {where}")
    for column in ("batch", "raw img/s, 1 / 2 callers", "pipeline img/s, 1 / 2 callers",
                   "best pipeline / best raw, paired (of the medians)"):
        table.add_column(column)
    for row in forward:
        table.add_row(str(row.batch), " / ".join(f"{v:.1f}" for v in row.raw_per_s.values()),
                      " / ".join(f"{v:.1f}" for v in row.pipeline_per_s.values()),
                      f"{row.ratio:.2f} ({row.ratio_of_medians:.2f})")
    console.print(table)
    table = Table(title=f"pipeline, one caller, ms an image: {where}")
    for column in ("batch", *bench.STAGES, "steps around the model", "model alone", "0.9 allows"):
        table.add_column(column)
    for row in forward:
        table.add_row(str(row.batch), *(f"{ms:.2f}" for ms in row.stages_ms.values()), f"{row.steps_ms:.2f}",
                      f"{row.model_ms:.2f}", f"{row.allowed_ms:.2f}")
    console.print(table)
    table = Table(title=f"large uploads, one thread, ms a photo before the model, whole / reduced: {where}")
    for column in ("upload", "decoded reduced to", *bench.UPLOAD_STAGES, "whole / reduced",
                   "cosine to the catalog photo, whole / reduced"):
        table.add_column(column)
    for row in uploads:
        table.add_row(f"{row.size[0]}x{row.size[1]} {row.format}, {row.kib:.0f} KiB",
                      f"{row.decoded[0]}x{row.decoded[1]}",
                      *(f"{row.whole_ms[name]:.1f} / {row.reduced_ms[name]:.1f}" for name in bench.UPLOAD_STAGES),
                      f"{row.ratio:.2f}x", f"{row.cosine['whole']:.4f} / {row.cosine['reduced']:.4f}")
    console.print(table)
    table = Table(title=f"search ms per job, {bench.CATALOG_VECTORS:,} vectors, k 10: {where}")
    for column in ("jobs in the micro-batch", "one search of the batch", "one search per job", "ratio"):
        table.add_column(column)
    for row in searches:
        table.add_row(str(row.batch), f"{row.batched_ms:.1f}", f"{row.per_job_ms:.1f}",
                      f"{row.per_job_ms / row.batched_ms:.2f}x")
    console.print(table)
    table = Table(title=f"jobs through Celery: {where}")
    for column in ("submitters", "micro-batch", "jobs/s", "vs no batching, paired", "p50 ms", "p95 ms",
                   "jobs per batch", "failed"):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: (r.submitters, r.batch_size)):
        table.add_row(str(row.submitters), "off" if row.batch_size == 1 else f"up to {row.batch_size}",
                      f"{row.jobs_per_s:.1f}", f"{row.vs_off:.2f}x",
                      f"{row.p50_ms:.0f}", f"{row.p95_ms:.0f}", f"{row.mean_batch:.1f}", str(row.failed))
    console.print(table)


@bench_app.command("scale")
def bench_scale(state_dir: Path = typer.Option(Path(".lookalike/bench"), help="Data, sockets and logs."),
                jobs: int = typer.Option(120, help="Search jobs per round."),
                products: int = typer.Option(400, help="Catalog events per round (at most the sample's 1200)."),
                rounds: int = typer.Option(3, help="Rounds per configuration; the median is shown.")) -> None:
    """Jobs/s with 1 then 2 worker processes, products/s with 1 then 2 indexers, and who did the work."""
    from ops import bench_scale as bench
    from ops.release import release
    from ops.stack import LocalStack
    from schemas.settings import Settings

    signal.signal(signal.SIGTERM, _interrupt)
    with LocalStack(state_dir) as stack:
        env = {**os.environ, **stack.environ(),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        release(Settings(**{k.removeprefix("LOOKALIKE_").lower(): v for k, v in stack.environ().items()}))
        logs = stack.state_dir / "bench-logs"
        logs.mkdir(exist_ok=True)
        runs = bench.bench_indexers(env, logs, (1, 2), products, rounds, say=console.print)
        runs += bench.bench_workers(env, logs, (1, 2), jobs, rounds, say=console.print)
    table = Table(title=f"lookalike bench scale: {bench.machine()}")
    for column in ("processes", "rate (median)", "ratio to 1", "work per process", "partitions owned", "lost"):
        table.add_column(column)
    base: dict[str, float] = {}
    for run in runs:
        unit = "jobs/s" if run.what == "workers" else "products/s"
        base.setdefault(run.what, run.rate)
        table.add_row(f"{run.processes} {run.what[:-1] if run.processes == 1 else run.what}",
                      f"{run.rate:.1f} {unit}", f"{run.rate / base[run.what]:.2f}x",
                      " / ".join(str(int(s)) for s in run.share),
                      " / ".join(",".join(map(str, p)) for p in run.partitions) or "-", str(run.lost))
    console.print(table)
    if any(run.lost for run in runs):
        raise typer.Exit(_fail("work was lost: see the logs in " + str(logs)))


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
