"""Every Prometheus metric of the worker and indexer processes (names ``lookalike_<what>_<unit>``)."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("lookalike_indexer_events_total", "Catalog events by outcome.", ["outcome"])
# outcome: applied | stale | dead_letter | replayed
INDEXER_BATCH_SECONDS = Histogram("lookalike_indexer_batch_seconds", "One micro-batch, poll to commit.")
INDEXER_RETRIES = Counter("lookalike_indexer_retries_total", "Batches retried after a transient error.")

JOBS = Counter("lookalike_worker_jobs_total", "Search jobs by outcome.", ["outcome"])
STAGE_SECONDS = Histogram("lookalike_worker_stage_seconds", "Time per pipeline stage.", ["stage"])
SHARD_VECTORS = Gauge("lookalike_shard_vectors", "Vectors in this process's replica of a shard.", ["shard"])
