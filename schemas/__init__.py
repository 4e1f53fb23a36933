"""The contract between processes: settings, HTTP bodies, Kafka events, Celery task names,
Redis job-store keys and SQL tables. Imports nothing heavy (no torch, no faiss)."""
