"""How fast the dashboard's aggregates are on a large request table.

Fills a fresh SQLite database (in a temporary data dir) with N request rows spread over the last week
(default 1,000,000; 4 models, 20 keys), then times each dashboard query: totals, time series and
breakdowns by model and by key, for the hour, day and week windows. Results go to stdout and to
docs/benchmarks.md between the analytics_bench markers.

    .venv/bin/python bench/analytics_bench.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- analytics_bench:start -->", "<!-- analytics_bench:end -->"


def setup_django(data_dir: str) -> None:
    os.environ["LLM_SERVICE_DATA_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmservice.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def fill(rows: int) -> float:
    from analytics.models import RequestLog

    rng = random.Random(0)
    now = datetime.now(UTC)
    models = ["smollm2", "llama-3.2-1b", "qwen2.5-0.5b", "tiny"]
    keys = [f"key-{i}" for i in range(20)]
    started = time.perf_counter()
    batch = []
    for i in range(rows):
        ok = rng.random() > 0.05
        batch.append(
            RequestLog(
                created_at=now - timedelta(seconds=rng.uniform(0, 7 * 86400)),
                model=rng.choice(models),
                key_name=rng.choice(keys),
                endpoint="chat.completions",
                stream=rng.random() < 0.7,
                status_code=200 if ok else 400,
                outcome="ok" if ok else "client_error",
                prompt_tokens=rng.randint(5, 500),
                completion_tokens=rng.randint(0, 300) if ok else 0,
                ttft_ms=rng.lognormvariate(5.5, 0.8) if ok else None,
                latency_ms=rng.uniform(50, 9000),
                tokens_per_second=rng.uniform(5, 80) if ok else None,
            )
        )
        if len(batch) == 20000 or i == rows - 1:
            RequestLog.objects.bulk_create(batch)
            batch = []
    return time.perf_counter() - started


def time_queries(repeat: int) -> list[tuple[str, float]]:
    from analytics import aggregates

    queries = []
    for window in ("hour", "day", "week"):
        queries += [
            (f"totals({window})", lambda w=window: aggregates.totals(w)),
            (f"series({window})", lambda w=window: aggregates.series(w)),
            (f"series({window}, by=model)", lambda w=window: aggregates.series(w, by="model")),
            (f"breakdown({window}, by=key)", lambda w=window: aggregates.breakdown(w, by="key")),
        ]
    queries.append(("recent(50)", lambda: aggregates.recent(50)))
    results = []
    for name, query in queries:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            query()
            times.append(time.perf_counter() - t)
        results.append((name, statistics.median(times)))
    return results


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{START}\n{text}\n{END}"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        current = head + section + rest.split(END, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="analytics-bench-") as data_dir:
        setup_django(data_dir)
        fill_s = fill(args.rows)
        print(f"inserted {args.rows:,} rows in {fill_s:.1f} s")
        from analytics.rollup import rebuild

        started = time.perf_counter()
        rollup_rows = rebuild()
        rollup_s = time.perf_counter() - started
        print(f"rolled up into {rollup_rows:,} hourly rows in {rollup_s:.1f} s")
        results = time_queries(args.repeat)
    lines = [
        "## Dashboard aggregates on a large request table",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, SQLite (WAL), "
        f"{args.rows:,} rows over 7 days, 4 models, 20 keys; median of {args.repeat} runs. "
        f"Rerun: `.venv/bin/python bench/analytics_bench.py --rows {args.rows}`.",
        "",
        "| query | time |",
        "|---|---|",
        *[f"| `{name}` | {seconds * 1000:.0f} ms |" for name, seconds in results],
        "",
        f"Filling the table with `bulk_create` took {fill_s:.0f} s; rebuilding the hourly rollup "
        f"({rollup_rows:,} rows, which day and week windows read; the recorder keeps it current as "
        f"it writes) took {rollup_s:.0f} s. The hour window reads the request rows directly.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
