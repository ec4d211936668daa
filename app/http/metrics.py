"""Prometheus metrics under vLLM's names, labelled by model_name.

Engine-side counters and gauges are read from `engine.stats()` at scrape time (one source of
truth); latency histograms and finished-request counts are recorded by the HTTP layer from each
request's outputs. Each app owns its registry, so several apps in one process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]  # fmt: skip
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


class EngineStatsCollector(Collector):
    """Exports the engine's own counters and gauges; nothing while the engine is loading."""

    def __init__(self, engine_getter: Callable[[], Any], model_name: str) -> None:
        self._engine_getter = engine_getter
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_getter()
        if engine is None:
            return
        stats = engine.stats()
        labels = [self._model_name]

        def gauge(name: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in the running batch.", stats.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be scheduled.", stats.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", stats.kv_cache_usage)
        yield counter("vllm:prompt_tokens", "Prefill tokens processed.", stats.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Generated tokens.", stats.generation_tokens_total)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions_total)
        yield counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits)


class ServerMetrics:
    """The app's registry and the per-request observations the HTTP layer makes."""

    def __init__(self, model_name: str, engine_getter: Callable[[], Any]) -> None:
        self.model_name = model_name
        disable_created_metrics()  # as vLLM does: no *_created series next to every counter
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineStatsCollector(engine_getter, model_name))
        label = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", label,
            buckets=TTFT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between consecutive outputs of a request.", label,
            buckets=ITL_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", label,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Time a request spent waiting before it was first scheduled.",
            label, buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.success = Counter(
            "vllm:request_success", "Finished sequences, by finish reason.", ["model_name", "finished_reason"],
            registry=self.registry,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Latency observations for one engine request, fed every output it yields."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self.started = time.time()
        self.first_output: float | None = None
        self._last_output: float | None = None
        self._done = False

    def observe(self, output: Any) -> None:
        now = time.time()
        label = self._metrics.model_name
        if self.first_output is None:
            self.first_output = now
            first_token = getattr(output.metrics, "first_token_time", None) if output.metrics else None
            arrival = getattr(output.metrics, "arrival_time", None) if output.metrics else None
            ttft = (first_token - arrival) if first_token and arrival else now - self.started
            self._metrics.ttft.labels(label).observe(max(ttft, 0.0))
        elif any(c.token_ids for c in output.outputs):
            self._metrics.itl.labels(label).observe(now - (self._last_output or now))
        self._last_output = now
        for completion in output.outputs:
            if completion.finish_reason is not None:
                self._metrics.success.labels(label, str(completion.finish_reason)).inc()
        if output.finished and not self._done:
            self._done = True
            self._observe_finish(output, now)

    def _observe_finish(self, output: Any, now: float) -> None:
        label = self._metrics.model_name
        m = output.metrics
        arrival = m.arrival_time if m and m.arrival_time else self.started
        finished = m.finished_time if m and m.finished_time else now
        self._metrics.e2e.labels(label).observe(max(finished - arrival, 0.0))
        if m and m.first_scheduled_time:
            self._metrics.queue_time.labels(label).observe(max(m.first_scheduled_time - arrival, 0.0))

    @property
    def ttft(self) -> float | None:
        return None if self.first_output is None else self.first_output - self.started
