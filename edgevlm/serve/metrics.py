"""Prometheus metrics of one server (prometheus-client, on a per-app ``CollectorRegistry`` so that several apps in
one process — tests — do not collide). ``GET /metrics`` renders ``ServeMetrics.render()``.

Families (all prefixed ``edgevlm_``): ``requests_total{endpoint,status}``, ``queue_depth`` (waiting),
``requests_running``, ``requests_cancelled_total{reason}`` (disconnect / timeout / shutdown), ``image_cache_hits_total``
/ ``image_cache_misses_total``, ``prompt_cached_tokens_total``, ``prompt_tokens_total``, ``completion_tokens_total``,
and histograms (seconds) ``queue_wait``, ``preprocess``, ``image_encode``, ``prefill``, ``ttft``, ``decode``,
``request`` (total runtime of a request).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeMetrics"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServeMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgevlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.queue_depth = Gauge("edgevlm_queue_depth", "requests waiting for the worker", registry=r)
        self.running = Gauge("edgevlm_requests_running", "requests the worker is running (0 or 1)", registry=r)
        self.cancelled = Counter("edgevlm_requests_cancelled", "generations stopped early", ["reason"], registry=r)
        self.image_cache_hits = Counter("edgevlm_image_cache_hits", "requests whose image embedding was cached",
                                        registry=r)
        self.image_cache_misses = Counter("edgevlm_image_cache_misses", "requests whose image was encoded",
                                          registry=r)
        self.cached_tokens = Counter("edgevlm_prompt_cached_tokens", "prompt tokens reused from the KV prefix cache",
                                     registry=r)
        self.prompt_tokens = Counter("edgevlm_prompt_tokens", "prompt tokens (image tokens included)", registry=r)
        self.completion_tokens = Counter("edgevlm_completion_tokens", "generated tokens", registry=r)
        h = lambda name, doc: Histogram(f"edgevlm_{name}_seconds", doc, buckets=_BUCKETS, registry=r)  # noqa: E731
        self.queue_wait = h("queue_wait", "admission -> the worker starts the request")
        self.preprocess = h("preprocess", "image decode + resize/normalize")
        self.image_encode = h("image_encode", "vision encoder (tower + projector)")
        self.prefill = h("prefill", "prompt prefill")
        self.ttft = h("ttft", "runtime request start -> first token")
        self.decode = h("decode", "decode steps after the first token")
        self.total = h("request", "runtime request total")

    def observe_result(self, result: Any, queue_s: float) -> None:
        t = result.timings
        self.queue_wait.observe(queue_s)
        self.preprocess.observe(t.preprocess_ms / 1e3)
        self.image_encode.observe(t.vision_ms / 1e3)
        self.prefill.observe(t.prefill_ms / 1e3)
        self.ttft.observe(t.ttft_ms / 1e3)
        self.decode.observe(t.decode_ms / 1e3)
        self.total.observe(t.total_ms / 1e3)
        self.prompt_tokens.inc(int(t.prompt_tokens))
        self.completion_tokens.inc(int(t.generated_tokens))
        cached = int(getattr(t, "cached_tokens", 0) or 0)
        if cached:
            self.cached_tokens.inc(cached)
        (self.image_cache_hits if getattr(t, "image_cache_hit", False) else self.image_cache_misses).inc()

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
