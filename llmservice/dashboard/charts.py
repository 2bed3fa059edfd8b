"""The Analytics page's data: `analytics.aggregates` shaped for Chart.js (one JSON document).

Buckets without requests are filled in (zero counts, no averages), so every chart has one point
per minute (last hour) or hour (last day, last week).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from django.utils import timezone

from analytics import aggregates

# Series per bucket: (key in the JSON, key in aggregates.series rows, value when no requests).
SERIES = [
    ("requests_per_minute", "requests_per_minute", 0),
    ("requests", "requests", 0),
    ("prompt_tokens", "prompt_tokens", 0),
    ("completion_tokens", "completion_tokens", 0),
    ("tokens_per_second", "tokens_per_second", None),
    ("ttft_p50_ms", "ttft_p50_ms", None),
    ("ttft_p95_ms", "ttft_p95_ms", None),
    ("errors", "errors", 0),
    ("cancelled", "cancelled", 0),
]
TABLE_FIELDS = [
    "name",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "cancelled",
    "tokens_per_second",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "latency_avg_ms",
]
RECENT = 50


def _number(value):
    """JSON has no infinity: a TTFT beyond the last histogram edge becomes None."""
    if isinstance(value, float):
        return None if math.isinf(value) or math.isnan(value) else round(value, 2)
    return value


def _truncate(moment: datetime, kind: str) -> datetime:
    moment = moment.replace(second=0, microsecond=0)
    return moment.replace(minute=0) if kind == "hour" else moment


def buckets(window: aggregates.Window, now: datetime) -> list[datetime]:
    step = timedelta(minutes=window.bucket_minutes)
    current = _truncate(now - window.span, window.bucket)
    out = []
    while current <= now:
        out.append(current)
        current += step
    return out


def _recent_row(row) -> dict:
    return {
        "created_at": row.created_at.isoformat(),
        "endpoint": row.endpoint,
        "model": row.model,
        "key_name": row.key_name,
        "stream": row.stream,
        "status_code": row.status_code,
        "outcome": row.outcome,
        "finish_reason": row.finish_reason,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "ttft_ms": _number(row.ttft_ms),
        "latency_ms": _number(row.latency_ms),
        "tokens_per_second": _number(row.tokens_per_second),
    }


def analytics_data(window: str) -> dict:
    now = timezone.now()
    w = aggregates.WINDOWS[window]
    rows = {r["bucket"]: r for r in aggregates.series(window, now=now)}
    edges = buckets(w, now)
    series = {key: [] for key, _, _ in SERIES}
    for edge in edges:
        row = rows.get(edge)
        for key, source, empty in SERIES:
            series[key].append(_number(row[source]) if row else empty)
    totals = {k: _number(v) for k, v in aggregates.totals(window, now=now).items()}

    def table(by: str) -> list[dict]:
        return [
            {k: _number(r.get(k)) for k in TABLE_FIELDS}
            for r in aggregates.breakdown(window, by=by, now=now)
        ]

    return {
        "window": window,
        "bucket_minutes": w.bucket_minutes,
        "generated_at": now.isoformat(),
        "buckets": [edge.isoformat() for edge in edges],
        "series": series,
        "totals": totals,
        "by_model": table("model"),
        "by_key": table("key"),
        "recent": [_recent_row(r) for r in aggregates.recent(RECENT)],
    }
