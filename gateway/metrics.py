"""Every Prometheus metric of the gateway (names ``lookalike_<what>_<unit>``)."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("lookalike_http_requests_total", "HTTP requests by route template and status.",
                   ["route", "status"])
REQUEST_SECONDS = Histogram("lookalike_http_request_seconds", "HTTP request time by route template.", ["route"])
JOBS_SUBMITTED = Counter("lookalike_jobs_submitted_total", "Search jobs accepted (202).")
UPLOADS_REJECTED = Counter("lookalike_uploads_rejected_total", "Uploads refused, by reason.", ["code"])
