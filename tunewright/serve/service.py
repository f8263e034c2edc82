"""What one server holds across its requests: the engine, its limits, the Prometheus metrics and the request log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tunewright.serve.engine import Engine
from tunewright.serve.requestlog import RequestLog, record


class Metrics:
    """The Prometheus metrics `/metrics` reports, in a registry of this server's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tunewright_requests", "Requests answered, by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tunewright_request_seconds", "Time to the whole answer", ["model", "endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.tokens = Counter("tunewright_tokens", "Tokens read and written", ["model", "kind"],
                              registry=self.registry)
        self.cache_hits = Counter("tunewright_cache_hits", "Answers served from the response cache", ["model"],
                                  registry=self.registry)
        self.in_progress = Gauge("tunewright_requests_in_progress", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.prefix_reused = Gauge("tunewright_prefix_tokens_reused", "Prompt tokens taken from KV-cache blocks "
                                   "earlier requests made (the shared system prompt), since the model was loaded",
                                   ["model"], registry=self.registry)
        self.log_written = Gauge("tunewright_request_log_written", "Records written to the request log",
                                 registry=self.registry)
        self.log_failures = Gauge("tunewright_request_log_failures", "Failed writes to the request log (retried)",
                                  registry=self.registry)
        self.log_dropped = Gauge("tunewright_request_log_dropped", "Records the request log gave up on",
                                 registry=self.registry)
        self.log_redactions = Gauge("tunewright_request_log_redactions", "PII and secrets the request log replaced "
                                    "with placeholders, by kind", ["kind"], registry=self.registry)

    def refresh(self, engine: Engine, request_log: RequestLog | None) -> None:
        """Set the gauges that are read from the engine and the request log when scraped."""
        self.in_progress.set(engine.waiting)
        for name, backend in engine.backends.items():
            self.prefix_reused.labels(name).set(backend.prefix_tokens_reused)
        if request_log is not None:
            self.log_written.set(request_log.written)
            self.log_failures.set(request_log.failures)
            self.log_dropped.set(request_log.dropped)
            for kind, n in dict(request_log.redactions).items():  # a copy: the writer thread adds kinds
                self.log_redactions.labels(kind).set(n)


@dataclass
class Service:
    """The engine and the limits a server answers with, and where each request is counted and logged."""

    engine: Engine
    max_tokens: int              # the longest answer a request may ask for, and the default
    request_log: RequestLog | None
    max_body_bytes: int
    api_keys: list[str]          # empty: the API is open
    open_metrics: bool = False   # /metrics answers without a key even when the API has keys
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    shadows: set = field(default_factory=set)  # shadow answers running (kept here so none is collected mid-way)

    def log(self, **fields) -> None:
        """One request's record in the request log (when the server keeps one)."""
        if self.request_log is not None:
            self.request_log.write(record(**fields))

    def count_refusal(self, endpoint: str, status: int, error: str, model: str | None = None, **logged) -> None:
        """Count and log a request answered with an error before any model saw it (`model` when it named one). The
        metric names a served model or none: a client's made-up name must not become a series, nor show on /metrics."""
        label = model if model is not None and model in self.engine.backends else ""
        self.metrics.requests.labels(label, endpoint, str(status)).inc()
        self.log(endpoint=endpoint, **({} if model is None else {"model": model}), status=status, error=error,
                 **logged)
