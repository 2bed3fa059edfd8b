"""Prometheus `/metrics`: request metrics as they happen, engine and download state at scrape time."""

from __future__ import annotations

import hmac

from django.apps import apps
from django.conf import settings
from django.http import HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inference.engine import current_engine

registry = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "llm_requests",
    "API requests by model, endpoint, HTTP status and outcome",
    ["model", "endpoint", "status", "outcome"],
    registry=registry,
)
PROMPT_TOKENS = Counter(
    "llm_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry
)
COMPLETION_TOKENS = Counter(
    "llm_completion_tokens", "Completion tokens returned", ["model"], registry=registry
)
TTFT = Histogram(
    "llm_time_to_first_token_seconds",
    "Time to first token",
    ["model"],
    registry=registry,
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
LATENCY = Histogram(
    "llm_request_latency_seconds",
    "Whole request latency",
    ["model", "endpoint"],
    registry=registry,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)


def observe_request(row: dict) -> None:
    model = row["model"] or "-"
    REQUESTS.labels(model, row["endpoint"], str(row["status_code"]), row["outcome"]).inc()
    if row["prompt_tokens"]:
        PROMPT_TOKENS.labels(model).inc(row["prompt_tokens"])
    if row["completion_tokens"]:
        COMPLETION_TOKENS.labels(model).inc(row["completion_tokens"])
    if row["ttft_ms"] is not None:
        TTFT.labels(model).observe(row["ttft_ms"] / 1000)
    LATENCY.labels(model, row["endpoint"]).observe(row["latency_ms"] / 1000)


class EngineCollector:
    """Reads the engine's state at scrape time; never starts an engine."""

    def collect(self):
        engine = current_engine()
        stats = engine.stats() if engine else None
        running = GaugeMetricFamily("llm_running_sequences", "Sequences in running batches")
        queued = GaugeMetricFamily("llm_queued_requests", "Sequences waiting to join a batch")
        loaded = GaugeMetricFamily("llm_loaded_models", "Models resident in memory")
        memory = GaugeMetricFamily("llm_model_memory_bytes", "Weights in memory", labels=["model"])
        tokens = CounterMetricFamily("llm_generated_tokens", "Tokens generated since start")
        in_engine = GaugeMetricFamily(
            "llm_engine_requests",
            "Requests the model's engine still holds, by its own count",
            labels=["model"],
        )
        caches = GaugeMetricFamily(
            "llm_cache_memory_bytes",
            "Caches that grow with use: kv (running sequences), prompt (prefix reuse)",
            labels=["model", "cache"],
        )
        running.add_metric([], stats.running if stats else 0)
        queued.add_metric([], stats.queued if stats else 0)
        loaded.add_metric([], len(stats.loaded_models) if stats else 0)
        for m in stats.loaded_models if stats else []:
            memory.add_metric([m.name], m.memory_bytes)
            in_engine.add_metric([m.name], m.engine_requests)
            for cache, size in m.cache_bytes.items():
                caches.add_metric([m.name, cache], size)
        tokens.add_metric([], stats.tokens_generated if stats else 0)
        yield from (running, queued, loaded, memory, tokens, in_engine, caches)


class DownloadCollector:
    """Progress of downloads in flight, from their rows (workers write them)."""

    @staticmethod
    def _families():
        done = GaugeMetricFamily(
            "llm_download_bytes_done", "Bytes downloaded", labels=["repo", "id"]
        )
        total = GaugeMetricFamily(
            "llm_download_bytes_total", "Bytes to download", labels=["repo", "id"]
        )
        return done, total

    def describe(self):
        # Without this, registering would call collect() and query the database at import time.
        return list(self._families())

    def collect(self):
        done, total = self._families()
        try:
            download = apps.get_model("models_app", "Download")
            rows = download.objects.filter(status__in=["queued", "running"]).values_list(
                "id", "repo_id", "bytes_done", "bytes_total"
            )
            for pk, repo, got, size in rows:
                done.add_metric([repo, str(pk)], got or 0)
                total.add_metric([repo, str(pk)], size or 0)
        except LookupError:
            pass
        yield from (done, total)


registry.register(EngineCollector())
registry.register(DownloadCollector())


def metrics_view(request):
    token = settings.METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HttpResponse("metrics token required\n", status=401, content_type="text/plain")
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
