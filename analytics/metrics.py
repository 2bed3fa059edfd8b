"""Prometheus `/metrics`: engine gauges read live at scrape time, request metrics as they happen."""

from __future__ import annotations

from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inference.engine import current_engine

registry = CollectorRegistry(auto_describe=True)


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
        running.add_metric([], stats["running"] if stats else 0)
        queued.add_metric([], stats["queued"] if stats else 0)
        loaded.add_metric([], len(stats["loaded_models"]) if stats else 0)
        for m in stats["loaded_models"] if stats else []:
            memory.add_metric([m["name"]], m["memory_bytes"])
        tokens.add_metric([], stats["tokens_generated"] if stats else 0)
        yield from (running, queued, loaded, memory, tokens)


registry.register(EngineCollector())


async def metrics_view(request):
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
