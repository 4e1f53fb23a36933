"""Every process's /metrics, scraped while the Procfile's processes do real work.

`web`, `worker` and `indexer` run under honcho (``procfile`` in conftest) on real PostgreSQL,
Redis and Kafka. The test scrapes all three, publishes a few sample products and one event
that can never succeed, submits jobs (two good photos, one corrupt), scrapes again and checks
that the series exist and moved by what was done: counters by the number of events and jobs,
lag back to 0 on every partition, shard sizes equal to the vectors in PostgreSQL. Where a
``prometheus`` binary is installed, a real Prometheus then scrapes them with
ops/prometheus.local.yml and evaluates ops/alerts.yml and every dashboard query.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import defaultdict
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import sqlalchemy as sa
import yaml
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from ops.publish import publish, read_catalog
from ops.stack import free_port
from schemas.jobs import JobStore
from schemas.tables import product_vectors, products
from tests.conftest import ROOT, SAMPLE, declared
from tests.test_end_to_end import MODEL_VERSION, search
from workers import catalog

Samples = dict[str, dict[frozenset, float]]  # sample name -> {labels: value}


def scrape(url: str) -> tuple[Samples, set[str]]:
    """Every sample of one /metrics page, and the names of the families it declares."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    samples: Samples = defaultdict(dict)
    families = set()
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist yet (a counter not yet incremented)."""
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for key, v in samples.get(name, {}).items()}


def vectors_per_shard(engine: sa.Engine) -> dict[str, float]:
    query = (sa.select(product_vectors.c.shard, sa.func.count())
             .join(products, products.c.id == product_vectors.c.product_id)
             .where(product_vectors.c.model_version == MODEL_VERSION, products.c.deleted.is_(False))
             .group_by(product_vectors.c.shard))
    with engine.connect() as conn:
        return {str(shard): float(n) for shard, n in conn.execute(query)}


@pytest.fixture(scope="module")
def before(procfile) -> dict[str, Samples]:
    """A scrape once the indexer owns every partition and the worker's replica has caught up on each."""
    deadline = time.monotonic() + 60
    while True:
        scraped = {name: scrape(url)[0] for name, url in procfile.metrics.items()}
        indexer = by_label(scraped["indexer"], "lookalike_indexer_lag_events", "partition")
        replica = by_label(scraped["worker"], "lookalike_replica_lag_changes", "partition")
        if len(indexer) == len(replica) == 4 and not any(replica.values()):
            return scraped
        assert time.monotonic() < deadline, f"indexer lag {indexer}, replica lag {replica}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def worked(procfile, before, settings, engine) -> dict[str, int]:
    """Publish 8 products and one bad event, wait until searchable, then run 3 jobs. Returns the counts."""
    events, errors = read_catalog(SAMPLE / "products.csv", SAMPLE / "images")
    assert not errors
    events = events[2::4][:8]  # none of them among the end-to-end test's events[::4]
    ids = [e.product_id for e in events]
    publish(settings.kafka_bootstrap, settings.products_topic, events)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    producer.send(settings.products_topic, key=b"1", value=b"{not json").get(timeout=30)
    producer.close()

    store = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)
    deadline = time.monotonic() + 120
    while True:
        live = catalog.count_vectors(engine, MODEL_VERSION)
        replicas = store.replicas()
        if catalog.count_vectors(engine, MODEL_VERSION, ids) == len(ids) and replicas and \
                all(r.ntotal >= live for r in replicas):
            break
        assert time.monotonic() < deadline, f"not searchable: replicas {replicas}"
        time.sleep(0.5)

    for product_id in ids[:2]:
        assert search(procfile.url, (SAMPLE / "images" / f"{product_id}.jpg").read_bytes())["status"] == "done"
    corrupt = search(procfile.url, (SAMPLE / "queries" / "17423.jpg").read_bytes()[:400])
    assert corrupt["error"]["code"] == "truncated"
    return {"products": len(ids), "dead_letters": 1, "done": 2, "rejected": 1}


@pytest.fixture(scope="module")
def after(procfile, worked, engine) -> dict[str, Samples]:
    """A scrape once lags are back to 0 and every replica shard has PostgreSQL's vectors (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        scraped = {name: scrape(url)[0] for name, url in procfile.metrics.items()}
        lags = {**by_label(scraped["indexer"], "lookalike_indexer_lag_events", "partition"),
                **{f"r{p}": v for p, v in by_label(scraped["worker"], "lookalike_replica_lag_changes",
                                                    "partition").items()}}
        shards = by_label(scraped["worker"], "lookalike_shard_vectors", "shard")
        if len(lags) == 8 and not any(lags.values()) and shards == {**dict.fromkeys(shards, 0.0),
                                                                    **vectors_per_shard(engine)}:
            return scraped
        if time.monotonic() > deadline:
            return scraped  # the tests below say what is off
        time.sleep(1)


def test_every_process_declares_its_metrics(procfile):
    from gateway import metrics as gateway_metrics
    from workers import metrics as worker_metrics

    for name, module in [("web", gateway_metrics), ("worker", worker_metrics), ("indexer", worker_metrics)]:
        _, families = scrape(procfile.metrics[name])
        missing = set(declared(module)) - families
        assert not missing, f"{name} does not serve {sorted(missing)}"


def test_the_gateway_counts_submitted_jobs_and_requests_and_reads_the_queue_depth(before, worked, after):
    web0, web = before["web"], after["web"]
    jobs = worked["done"] + worked["rejected"]
    assert value(web, "lookalike_jobs_submitted_total") - value(web0, "lookalike_jobs_submitted_total") == jobs
    accepted = {"route": "/v1/jobs", "status": "202"}
    assert value(web, "lookalike_http_requests_total", **accepted) - \
        value(web0, "lookalike_http_requests_total", **accepted) == jobs
    assert value(web, "lookalike_http_request_seconds_count", route="/v1/jobs/{job_id}") > 0
    assert by_label(web, "lookalike_queue_depth_jobs", "queue") == {"vision": 0.0}  # every job was taken


def test_the_worker_counts_jobs_by_outcome_and_times_every_stage(before, worked, after):
    w0, w = before["worker"], after["worker"]
    name = "lookalike_worker_jobs_total"
    assert value(w, name, outcome="done", reason="") - value(w0, name, outcome="done", reason="") == worked["done"]
    assert value(w, name, outcome="rejected", reason="truncated") - \
        value(w0, name, outcome="rejected", reason="truncated") == worked["rejected"]
    stages = "lookalike_worker_stage_seconds_count"
    grew = {stage: value(w, stages, stage=stage) - value(w0, stages, stage=stage)
            for stage in ("queue_wait", "decode", "segment", "embed", "nearest", "classify", "filter", "search",
                          "join", "total")}
    assert grew == {"queue_wait": 3, "decode": 3, "segment": 2, "embed": 2, "nearest": 2, "classify": 2, "filter": 2,
                    "search": 0, "join": 2, "total": 2}  # unfiltered jobs: the batch's search answers them
    assert value(w, "lookalike_worker_stage_seconds_sum", stage="total") > \
        value(w0, "lookalike_worker_stage_seconds_sum", stage="total")
    assert value(w, "lookalike_embedded_images_total") - value(w0, "lookalike_embedded_images_total") == 2
    assert value(w, "lookalike_embed_batch_images_count") - value(w0, "lookalike_embed_batch_images_count") == 2


def test_the_worker_replica_matches_postgres_with_no_lag_and_measures_freshness(before, worked, after, engine):
    w0, w = before["worker"], after["worker"]
    assert by_label(w, "lookalike_replica_lag_changes", "partition") == {str(p): 0.0 for p in range(4)}
    expected = vectors_per_shard(engine)
    assert sum(expected.values()) >= worked["products"]
    assert by_label(w, "lookalike_shard_vectors", "shard") == {**{str(p): 0.0 for p in range(4)}, **expected}
    fresh = "lookalike_replica_freshness_seconds"
    observed = value(w, f"{fresh}_count") - value(w0, f"{fresh}_count")
    assert observed == worked["products"]  # every new product once, and no catch-up replay
    within_10s = value(w, f"{fresh}_bucket", le="10.0") - value(w0, f"{fresh}_bucket", le="10.0")
    assert within_10s == observed


def test_the_indexer_counts_events_and_dead_letters_and_its_lag_returns_to_zero(before, worked, after, engine):
    i0, i = before["indexer"], after["indexer"]
    # the only indexer owns every shard; its copy holds what Postgres holds
    assert by_label(i, "lookalike_indexer_shard_vectors", "shard") == \
        {**{str(p): 0.0 for p in range(4)}, **vectors_per_shard(engine)}
    events = "lookalike_indexer_events_total"
    assert value(i, events, outcome="applied") - value(i0, events, outcome="applied") == worked["products"]
    assert value(i, events, outcome="dead_letter") - value(i0, events, outcome="dead_letter") == \
        worked["dead_letters"]
    assert by_label(i, "lookalike_indexer_lag_events", "partition") == {str(p): 0.0 for p in range(4)}
    assert value(i, "lookalike_embedded_images_total") - value(i0, "lookalike_embedded_images_total") == \
        worked["products"]
    assert value(i, "lookalike_indexer_batch_events_sum") - value(i0, "lookalike_indexer_batch_events_sum") == \
        worked["products"] + worked["dead_letters"]


def test_model_load_time_is_reported_and_gpu_memory_only_on_cuda(after):
    for name in ("worker", "indexer"):
        loads = after[name]["lookalike_model_load_seconds"]
        assert len(loads) == 1, loads
        (labels, seconds), = loads.items()
        assert dict(labels)["model_version"] == MODEL_VERSION and seconds > 0
        gpu = after[name].get("lookalike_gpu_memory_bytes", {})
        if dict(labels)["device"] == "cuda":
            assert {dict(key)["kind"] for key in gpu} == {"allocated", "reserved"}
        else:
            assert gpu == {}


PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def prometheus(procfile, worked, tmp_path_factory):
    """A real Prometheus on ops/prometheus.local.yml and ops/alerts.yml, its targets pointed at this
    session's processes, scraping and evaluating every second. Yields its base URL."""
    config = yaml.safe_load((ROOT / "ops" / "prometheus.local.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "ops" / rule) for rule in config["rule_files"]]
    hosts = {"lookalike-web": procfile.url, "lookalike-worker": procfile.metrics["worker"],
             "lookalike-indexer": procfile.metrics["indexer"]}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [urlsplit(hosts[job["job_name"]]).netloc]}]
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={urlsplit(url).netloc}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def api(url: str, path: str, **params) -> dict:
    body = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_prometheus_scrapes_every_process_and_evaluates_every_alert_and_panel(prometheus, engine):
    down = ("LookalikeWorkerDown", "LookalikeNoWorker", "LookalikeIndexerDown", "LookalikeGatewayDown")
    deadline = time.monotonic() + 60
    while True:  # every target up, and the rules evaluated since (before the first scrape, `up` is absent)
        targets = api(prometheus, "targets")["activeTargets"]
        rules = {rule["name"]: rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]}
        if len(targets) == 3 and all(t["health"] == "up" for t in targets) and \
                rules and all(rules[name]["state"] == "inactive" for name in down):
            break
        assert time.monotonic() < deadline, f"targets {targets}, rules {rules}"
        time.sleep(1)
    assert {t["labels"]["job"] for t in targets} == {"lookalike-web", "lookalike-worker", "lookalike-indexer"}
    assert {name: rule["health"] for name, rule in rules.items()} == dict.fromkeys(rules, "ok")
    assert float(api(prometheus, "query", query="sum(lookalike_shard_vectors)")["result"][0]["value"][1]) == \
        sum(vectors_per_shard(engine).values())

    dashboard = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "lookalike.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            query = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
            assert api(prometheus, "query", query=query)["resultType"] == "vector", panel["title"]
