"""Dashboard aggregates.

The last hour is computed from the request rows in the database (one grouped query per chart, by
minute). Days and weeks read the hourly rollup (analytics.rollup), so they stay fast with millions
of request rows; their windows start on a whole hour.

Percentiles of time to first token come from a histogram (conditional counts per bin edge), like
Prometheus' histogram_quantile: each is the upper edge of the bin holding that quantile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Avg, Count, F, Q, Sum
from django.db.models.functions import Coalesce, Trunc
from django.utils import timezone

from analytics.models import RequestHour, RequestLog
from analytics.rollup import TTFT_EDGES


@dataclass(frozen=True)
class Window:
    name: str
    span: timedelta
    bucket: str  # a Trunc kind
    bucket_minutes: int


WINDOWS = {
    "hour": Window("hour", timedelta(hours=1), "minute", 1),
    "day": Window("day", timedelta(days=1), "hour", 60),
    "week": Window("week", timedelta(days=7), "hour", 60),
}

ERRORS = Q(outcome__in=RequestLog.ERROR_OUTCOMES)


def _measures() -> dict:
    measures = {
        "requests": Count("id"),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "errors": Count("id", filter=ERRORS),
        "cancelled": Count("id", filter=Q(outcome=RequestLog.Outcome.CANCELLED)),
        "tokens_per_second": Avg("tokens_per_second"),
        "ttft_avg_ms": Avg("ttft_ms"),
        "latency_avg_ms": Avg("latency_ms"),
        "ttft_n": Count("ttft_ms"),
    }
    for edge in TTFT_EDGES:
        measures[f"ttft_le_{edge}"] = Count("id", filter=Q(ttft_ms__lte=edge))
    return measures


def _quantile(row: dict, q: float) -> float | None:
    total = row.pop("ttft_n")
    counts = [row.pop(f"ttft_le_{edge}") for edge in TTFT_EDGES]
    if not total:
        return None
    for edge, count in zip(TTFT_EDGES, counts, strict=True):
        if count >= q * total:
            return float(edge)
    return float("inf")


def _finish(row: dict) -> dict:
    histogram = {k: row[k] for k in row if k.startswith("ttft_le_") or k == "ttft_n"}
    row["ttft_p50_ms"] = _quantile(dict(histogram), 0.5)
    row["ttft_p95_ms"] = _quantile(histogram, 0.95)
    for k in [k for k in row if k.startswith("ttft_le_") or k == "ttft_n"]:
        del row[k]
    return row


def _window(window: str, now: datetime | None) -> tuple[Window, datetime, datetime]:
    try:
        w = WINDOWS[window]
    except KeyError:
        raise ValueError(f"window must be one of {sorted(WINDOWS)}") from None
    end = now or timezone.now()
    return w, end - w.span, end


def series(
    window: str = "hour", *, by: str | None = None, now: datetime | None = None
) -> list[dict]:
    """Per time bucket (and per model or key when `by` says so) over the window."""
    w, start, end = _window(window, now)
    if w.bucket == "hour":
        field = {"model": "model", "key": "key_name"}[by] if by else None
        groups = _rollup_groups(
            start, end, lambda r: (r.hour, getattr(r, field)) if field else (r.hour,)
        )
        out = []
        for group_key, row in sorted(groups.items()):
            row["bucket"] = group_key[0]
            if field:
                row[field] = group_key[1]
            row["requests_per_minute"] = row["requests"] / w.bucket_minutes
            out.append(row)
        return out
    group = ["bucket"] + ({"model": ["model"], "key": ["key_name"]}[by] if by else [])
    rows = (
        RequestLog.objects.filter(created_at__gte=start, created_at__lte=end)
        .annotate(bucket=Trunc("created_at", w.bucket))
        .values(*group)
        .annotate(**_measures())
        .order_by(*group)
    )
    out = []
    for row in rows:
        row = _finish(dict(row))
        row["requests_per_minute"] = row["requests"] / w.bucket_minutes
        out.append(row)
    return out


def breakdown(
    window: str = "hour", *, by: str = "model", now: datetime | None = None
) -> list[dict]:
    """Totals over the window per model or per API key, busiest first."""
    w, start, end = _window(window, now)
    field = {"model": "model", "key": "key_name"}[by]
    if w.bucket == "hour":
        groups = _rollup_groups(start, end, lambda r: getattr(r, field))
        rows = [{"name": name, **row} for name, row in groups.items()]
        return sorted(rows, key=lambda r: (-r["requests"], r["name"]))
    rows = (
        RequestLog.objects.filter(created_at__gte=start, created_at__lte=end)
        .values(name=F(field))
        .annotate(**_measures())
        .order_by("-requests", "name")
    )
    return [_finish(dict(row)) for row in rows]


def totals(window: str = "hour", *, now: datetime | None = None) -> dict:
    w, start, end = _window(window, now)
    if w.bucket == "hour":
        return _rollup_groups(start, end, lambda r: None).get(None) or _combine([])
    row = RequestLog.objects.filter(created_at__gte=start, created_at__lte=end).aggregate(
        **_measures()
    )
    return _finish(row)


def _rollup_groups(start: datetime, end: datetime, key) -> dict:
    hour = start.replace(minute=0, second=0, microsecond=0)
    grouped: dict = {}
    for r in RequestHour.objects.filter(hour__gte=hour, hour__lte=end):
        grouped.setdefault(key(r), []).append(r)
    return {k: _combine(v) for k, v in grouped.items()}


def _combine(parts: list[RequestHour]) -> dict:
    def total(field: str):
        return sum(getattr(p, field) for p in parts)

    bins = [sum(col) for col in zip(*(p.ttft_bins for p in parts), strict=True)] if parts else []
    tps_n, ttft_n, requests = total("tps_n"), total("ttft_n"), total("requests")
    row = {
        "requests": requests,
        "prompt_tokens": total("prompt_tokens"),
        "completion_tokens": total("completion_tokens"),
        "errors": total("errors"),
        "cancelled": total("cancelled"),
        "tokens_per_second": total("tps_sum") / tps_n if tps_n else None,
        "ttft_avg_ms": total("ttft_sum") / ttft_n if ttft_n else None,
        "latency_avg_ms": total("latency_sum") / requests if requests else None,
        "ttft_n": ttft_n,
    }
    cumulative = 0
    for edge, count in zip(TTFT_EDGES, bins, strict=False):
        cumulative += count
        row[f"ttft_le_{edge}"] = cumulative
    for edge in TTFT_EDGES[len(bins) :]:
        row[f"ttft_le_{edge}"] = 0
    return _finish(row)


def recent(limit: int = 50) -> list[RequestLog]:
    return list(RequestLog.objects.all()[:limit])


def prune(days: int, *, now: datetime | None = None) -> int:
    """Delete rows older than `days`; returns how many."""
    cutoff = (now or timezone.now()) - timedelta(days=days)
    deleted, _ = RequestLog.objects.filter(created_at__lt=cutoff).delete()
    RequestHour.objects.filter(hour__lt=cutoff.replace(minute=0, second=0, microsecond=0)).delete()
    return deleted
