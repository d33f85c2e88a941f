"""Prometheus metrics of the embedding server, exported through Ray's metrics system.

Metrics are created with ``ray.util.metrics`` inside each replica; Ray's metrics agent exports
them on every node's metrics port with a ``ray_`` prefix, and counters gain ``_total``
(``babelforge_serve_requests`` is scraped as ``ray_babelforge_serve_requests_total``).
:data:`EXPORTED_NAMES` lists the names dashboards query. Every series carries a ``model`` tag::

    >>> metrics = ServeMetrics("me5-small")                              # doctest: +SKIP
    >>> metrics.record_request("/v1/embeddings", 200, seconds=0.012)    # doctest: +SKIP
    >>> # rate(ray_babelforge_serve_tokens_total[1m]) is the token throughput in tokens/s
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

from babelforge.serve.batcher import BatchReport

__all__ = ["ServeMetrics", "EXPORTED_NAMES", "METRIC_PREFIX"]

METRIC_PREFIX = "babelforge_serve_"

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
BATCH_TOKEN_BOUNDARIES = [16, 64, 256, 1024, 4096, 16384, 65536, 262144]

# Name as scraped from Ray's metrics endpoint -> meaning (histograms add _bucket, _sum, _count).
EXPORTED_NAMES: dict[str, str] = {
    "ray_babelforge_serve_requests_total": "HTTP requests by route and status",
    "ray_babelforge_serve_errors_total": "error responses by route, status and error code",
    "ray_babelforge_serve_request_latency_seconds": "request latency histogram by route",
    "ray_babelforge_serve_batch_size": "histogram of texts per executed batch",
    "ray_babelforge_serve_batch_requests": "histogram of requests pooled into one batch",
    "ray_babelforge_serve_batch_tokens": "histogram of tokens per executed batch",
    "ray_babelforge_serve_batch_duration_seconds": "histogram of the time one batch spends in the model",
    "ray_babelforge_serve_inputs_total": "texts embedded (rate = inputs/s)",
    "ray_babelforge_serve_tokens_total": "tokens embedded (rate = tokens/s)",
}


class ServeMetrics:
    """The replica's metric objects, recorded once per request, error and batch."""

    def __init__(self, model_name: str) -> None:
        tags = {"model": model_name}

        def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()) -> Counter:
            return Counter(METRIC_PREFIX + name, description, tag_keys=("model", *tag_keys)).set_default_tags(tags)

        def histogram(name: str, description: str, boundaries: list[float],
                      tag_keys: tuple[str, ...] = ()) -> Histogram:
            return Histogram(METRIC_PREFIX + name, description, boundaries=boundaries,
                             tag_keys=("model", *tag_keys)).set_default_tags(tags)

        self.requests = counter("requests", "HTTP requests by route and status", ("route", "status"))
        self.errors = counter("errors", "Error responses by route, status and error code", ("route", "status", "code"))
        self.latency = histogram("request_latency_seconds", "Request latency in seconds", LATENCY_BOUNDARIES_S,
                                 ("route",))
        self.batch_size = histogram("batch_size", "Texts per executed batch", BATCH_SIZE_BOUNDARIES)
        self.batch_requests = histogram("batch_requests", "Requests pooled into one batch", BATCH_SIZE_BOUNDARIES)
        self.batch_tokens = histogram("batch_tokens", "Tokens per executed batch", BATCH_TOKEN_BOUNDARIES)
        self.batch_duration = histogram("batch_duration_seconds", "Time one batch spends in the model",
                                        LATENCY_BOUNDARIES_S)
        self.inputs = counter("inputs", "Texts embedded")
        self.tokens = counter("tokens", "Tokens embedded")

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def record_error(self, route: str, status: int, code: str) -> None:
        self.errors.inc(1, tags={"route": route, "status": str(status), "code": code})

    def record_batch(self, report: BatchReport) -> None:
        self.batch_size.observe(report.inputs)
        self.batch_requests.observe(report.requests)
        self.batch_tokens.observe(report.tokens)
        self.batch_duration.observe(report.seconds)
        self.inputs.inc(report.inputs)
        if report.tokens > 0:
            self.tokens.inc(report.tokens)
