"""The hourly rollup (RequestHour): adding request rows to it, and rebuilding it."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable

from django.db import transaction

from analytics.models import RequestHour, RequestLog

# TTFT histogram edges in milliseconds; bin i counts TTFTs in (edge[i-1], edge[i]], the last bin
# everything above the last edge.
TTFT_EDGES = (25, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 20000, 60000)


def _get(row, name):
    return row[name] if isinstance(row, dict) else getattr(row, name)


def _partials(rows: Iterable) -> dict[tuple, dict]:
    acc: dict[tuple, dict] = defaultdict(
        lambda: {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "errors": 0,
            "cancelled": 0,
            "tps_sum": 0.0,
            "tps_n": 0,
            "ttft_sum": 0.0,
            "ttft_n": 0,
            "latency_sum": 0.0,
            "ttft_bins": [0] * (len(TTFT_EDGES) + 1),
        }
    )
    for row in rows:
        created = _get(row, "created_at")
        key = (
            created.replace(minute=0, second=0, microsecond=0),
            _get(row, "model"),
            _get(row, "key_name"),
        )
        a = acc[key]
        a["requests"] += 1
        a["prompt_tokens"] += _get(row, "prompt_tokens")
        a["completion_tokens"] += _get(row, "completion_tokens")
        outcome = _get(row, "outcome")
        a["errors"] += outcome in RequestLog.ERROR_OUTCOMES
        a["cancelled"] += outcome == RequestLog.Outcome.CANCELLED
        tps = _get(row, "tokens_per_second")
        if tps is not None:
            a["tps_sum"] += tps
            a["tps_n"] += 1
        ttft = _get(row, "ttft_ms")
        if ttft is not None:
            a["ttft_sum"] += ttft
            a["ttft_n"] += 1
            a["ttft_bins"][bisect.bisect_left(TTFT_EDGES, ttft)] += 1
        a["latency_sum"] += _get(row, "latency_ms")
    return acc


@transaction.atomic
def add_rows(rows: Iterable) -> None:
    """Fold request rows (RequestLog objects or dicts with its fields) into the hourly rollup."""
    for (hour, model, key_name), part in _partials(rows).items():
        row, _ = RequestHour.objects.select_for_update().get_or_create(
            hour=hour,
            model=model,
            key_name=key_name,
            defaults={"ttft_bins": [0] * (len(TTFT_EDGES) + 1)},
        )
        for field, value in part.items():
            if field == "ttft_bins":
                row.ttft_bins = [
                    x + y for x, y in zip(row.ttft_bins or [0] * len(value), value, strict=True)
                ]
            else:
                setattr(row, field, getattr(row, field) + value)
        row.save()


def rebuild(batch: int = 50_000) -> int:
    """Recompute the rollup from every RequestLog row; returns the rollup rows written."""
    with transaction.atomic():
        RequestHour.objects.all().delete()
        fields = [
            "created_at",
            "model",
            "key_name",
            "prompt_tokens",
            "completion_tokens",
            "outcome",
            "tokens_per_second",
            "ttft_ms",
            "latency_ms",
        ]
        partials: dict[tuple, dict] = {}
        for part_key, part in _partials(RequestLog.objects.values(*fields).iterator(batch)).items():
            partials[part_key] = part
        RequestHour.objects.bulk_create(
            [RequestHour(hour=h, model=m, key_name=k, **p) for (h, m, k), p in partials.items()],
            batch_size=2000,
        )
    return len(partials)
