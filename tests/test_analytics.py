"""Per-request analytics in the database and /metrics, key limits, health, and the aggregates."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.helpers import Server, wait_until
from tests.test_chat_completions import NO_EOS


@pytest.fixture(scope="module")
def observed(tmp_path_factory, tiny_dir):
    srv = Server(tmp_path_factory.mktemp("observed"), models=[("tiny", tiny_dir, True)])
    srv.start()
    yield srv
    srv.stop()


def rows(server: Server) -> list[dict]:
    code = (
        "import json; from analytics.models import RequestLog as R; "
        "print(json.dumps(list(R.objects.order_by('id').values("
        "'endpoint','model','key_name','stream','status_code','outcome','error_type',"
        "'finish_reason','prompt_tokens','completion_tokens','ttft_ms','latency_ms',"
        "'queue_ms','tokens_per_second'))))"
    )
    return json.loads(server.manage("shell", "--no-imports", "-c", code).stdout)


def make_key(server: Server, name: str, **fields) -> str:
    code = (
        f"from llmservice.models import ApiKey; k, raw = ApiKey.generate({name!r}); "
        + "".join(f"setattr(k, {f!r}, {v!r}); " for f, v in fields.items())
        + "k.save(); print(raw)"
    )
    return server.manage("shell", "--no-imports", "-c", code).stdout.strip()


def test_every_request_is_recorded_and_counted_in_metrics(observed):
    key = make_key(observed, "analyst")
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0)
    ok1 = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=5, extra_body=NO_EOS
    )
    stream = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "b"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    ok3 = client.completions.create(model="tiny", prompt="c", max_tokens=4, extra_body=NO_EOS)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "d"}], temperature=9
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "e"}])
    assert httpx.get(observed.url + "/v1/models").status_code == 401
    with observed.chat_stream("f", 1500, api_key=key, **NO_EOS) as events:
        for _ in range(4):
            next(events)
    wait_until(lambda: len(rows(observed)) >= 7, timeout=15, interval=0.3)
    recorded = rows(observed)
    assert len(recorded) == 7
    by_outcome = {}
    for r in recorded:
        by_outcome.setdefault(r["outcome"], []).append(r)
    assert len(by_outcome["ok"]) == 3
    assert len(by_outcome["client_error"]) == 3
    assert len(by_outcome["cancelled"]) == 1
    first, streamed, completion = by_outcome["ok"]
    assert (first["endpoint"], first["stream"], first["key_name"]) == (
        "chat.completions",
        False,
        "analyst",
    )
    assert first["prompt_tokens"] == ok1.usage.prompt_tokens
    assert first["completion_tokens"] == 5 and first["finish_reason"] == "length"
    assert first["ttft_ms"] > 0 and first["latency_ms"] >= first["ttft_ms"]
    assert first["queue_ms"] is not None and first["tokens_per_second"] > 0
    assert (
        streamed["stream"] and streamed["completion_tokens"] == stream[-1].usage.completion_tokens
    )
    assert completion["endpoint"] == "completions"
    assert completion["completion_tokens"] == ok3.usage.completion_tokens
    errors = {(r["status_code"], r["error_type"]) for r in by_outcome["client_error"]}
    assert errors == {
        (400, "invalid_request_error"),
        (404, "invalid_request_error"),
        (401, "invalid_request_error"),
    }
    cancelled = by_outcome["cancelled"][0]
    assert cancelled["stream"] and 0 < cancelled["completion_tokens"] < 1500

    metrics = httpx.get(observed.url + "/metrics").text
    assert (
        'llm_requests_total{endpoint="chat.completions",model="tiny",outcome="ok",status="200"} 2.0'
        in metrics
    )
    assert (
        'llm_requests_total{endpoint="completions",model="tiny",outcome="ok",status="200"} 1.0'
        in metrics
    )
    assert 'outcome="cancelled",status="200"} 1.0' in metrics
    assert (
        'llm_requests_total{endpoint="chat.completions",model="nope",' not in metrics
    )  # unknown: not a model label
    completion_total = sum(r["completion_tokens"] for r in recorded if r["model"] == "tiny")
    assert f'llm_completion_tokens_total{{model="tiny"}} {float(completion_total)}' in metrics
    assert "llm_time_to_first_token_seconds_count" in metrics
    assert observed.metric("llm_requests_total") == 7


def test_rows_written_just_before_shutdown_are_not_lost(tmp_path, tiny_dir):
    server = Server(tmp_path, models=[("tiny", tiny_dir, True)]).start()
    try:
        server.openai().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    finally:
        server.stop()  # at once: well inside the one-second batch interval
    assert len(rows(server)) == 1


def test_a_requests_per_minute_limit_trips_at_the_next_request(observed):
    key = make_key(observed, "limited", rpm_limit=3)
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0)
    for _ in range(3):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        client.models.list()
    assert info.value.body["type"] == "rate_limit_exceeded"
    assert 1 <= int(info.value.response.headers["Retry-After"]) <= 60
    # Other keys are not affected.
    assert observed.openai().models.list()


def test_a_tokens_per_minute_limit_trips_once_the_tokens_are_spent(observed):
    key = make_key(observed, "frugal", tpm_limit=60)
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=40, extra_body=NO_EOS
    )
    assert reply.usage.total_tokens >= 60
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "tokens per minute" in info.value.body["message"]


def test_an_expired_key_is_refused(observed):
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    key = make_key(observed, "old", expires_at=past)
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0).models.list()
    assert "expired" in info.value.body["message"]


def test_a_key_sees_and_uses_only_its_allowed_models(observed, tiny2_dir):
    observed.manage("import_model", str(tiny2_dir), "--name", "other")
    key = make_key(observed, "narrow", allowed_models=["tiny"])
    client = openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert (
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
        ).model
        == "tiny"
    )


def test_last_used_at_is_recorded(observed):
    key = make_key(observed, "tracked")
    openai.OpenAI(base_url=observed.url + "/v1", api_key=key, max_retries=0).models.list()
    out = observed.manage(
        "shell",
        "--no-imports",
        "-c",
        "from llmservice.models import ApiKey; "
        "print(ApiKey.objects.get(name='tracked').last_used_at is not None)",
    )
    assert out.stdout.strip() == "True"


def test_metrics_can_require_a_token(tmp_path, tiny_dir):
    server = Server(tmp_path, env={"LLM_SERVICE_METRICS_TOKEN": "scrape-me"}).start()
    try:
        assert httpx.get(server.url + "/metrics").status_code == 401
        ok = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and "llm_running_sequences" in ok.text
    finally:
        server.stop()


def test_ready_reports_the_default_model_once_loaded(observed):
    body = wait_until(
        lambda: (r := httpx.get(observed.url + "/ready")).status_code == 200 and r.json()
    )
    assert body["default_model"] == {"name": "tiny", "status": "ready", "error": ""}
    assert "tiny" in body["loaded_models"]


@pytest.mark.django_db
def test_ready_is_503_while_the_default_model_loads():
    from django.test import Client

    from inference.serving import base as serving

    client = Client()
    saved = serving.preload.status
    serving.preload.status = "loading"
    try:
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["status"] == "loading"
    finally:
        serving.preload.status = saved
    assert client.get("/health").status_code == 200


@pytest.mark.django_db
def test_the_dashboard_aggregates_match_a_hand_computed_set():
    from analytics import aggregates, rollup
    from analytics.models import RequestLog

    now = datetime(2026, 5, 1, 12, 30, 30, tzinfo=UTC)
    minute = now.replace(second=0)

    def row(at, model, key, ttft, prompt=10, completion=20, outcome="ok", status=200, tps=50.0):
        return RequestLog(
            created_at=at,
            model=model,
            key_name=key,
            endpoint="chat.completions",
            status_code=status,
            outcome=outcome,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_ms=ttft,
            latency_ms=1000.0,
            tokens_per_second=tps,
        )

    RequestLog.objects.bulk_create(
        [
            row(minute + timedelta(seconds=5), "a", "k1", 40),
            row(minute + timedelta(seconds=10), "a", "k1", 90),
            row(minute + timedelta(seconds=20), "b", "k2", 400, tps=30.0),
            row(
                minute - timedelta(minutes=5),
                "a",
                "k2",
                1200,
                prompt=7,
                completion=0,
                outcome="client_error",
                status=400,
                tps=None,
            ),
            row(
                minute - timedelta(minutes=5),
                "b",
                "k1",
                None,
                prompt=0,
                completion=0,
                outcome="cancelled",
            ),
            row(now - timedelta(hours=3), "a", "k1", 50),  # outside the hour, inside the day
            row(now - timedelta(days=3), "a", "k1", 50),  # only in the week
        ]
    )
    # Day and week charts read the hourly rollup, which the recorder keeps as it writes rows.
    rollup.add_rows(RequestLog.objects.all())

    hour = aggregates.totals("hour", now=now)
    assert hour["requests"] == 5
    assert hour["prompt_tokens"] == 10 + 10 + 10 + 7 + 0
    assert hour["completion_tokens"] == 60
    assert hour["errors"] == 1 and hour["cancelled"] == 1
    assert hour["tokens_per_second"] == pytest.approx((50 + 50 + 30 + 50) / 4)
    # TTFTs 40, 90, 400, 1200: p50 lies in the (50, 100] bin, p95 in the (1000, 1500] bin.
    assert hour["ttft_p50_ms"] == 100 and hour["ttft_p95_ms"] == 1500

    series = aggregates.series("hour", now=now)
    assert [(s["bucket"], s["requests"]) for s in series] == [
        (minute - timedelta(minutes=5), 2),
        (minute, 3),
    ]
    assert series[1]["completion_tokens"] == 60 and series[1]["ttft_p50_ms"] == 100

    by_model = {r["name"]: r for r in aggregates.breakdown("hour", by="model", now=now)}
    assert by_model["a"]["requests"] == 3 and by_model["b"]["requests"] == 2
    by_key = {r["name"]: r for r in aggregates.breakdown("day", by="key", now=now)}
    assert by_key["k1"]["requests"] == 4 and by_key["k2"]["requests"] == 2
    assert aggregates.totals("week", now=now)["requests"] == 7
    per_model = aggregates.series("day", by="model", now=now)
    assert {(s["model"], s["requests"]) for s in per_model} == {("a", 1), ("a", 3), ("b", 2)}

    assert aggregates.prune(2, now=now) == 1
    assert RequestLog.objects.count() == 6


def test_old_rows_are_pruned_by_the_workers_task(observed):
    observed.manage(
        "shell",
        "--no-imports",
        "-c",
        "from datetime import timedelta; from django.utils import timezone; "
        "from analytics.models import RequestLog as R; "
        "R.objects.create(created_at=timezone.now() - timedelta(days=400), endpoint='models', "
        "status_code=200, outcome='ok', latency_ms=1); "
        "R.objects.create(endpoint='models', status_code=200, outcome='ok', latency_ms=1)",
    )
    count_old = (
        "from datetime import timedelta; from django.utils import timezone; "
        "from analytics.models import RequestLog as R; "
        "print(R.objects.filter(created_at__lt=timezone.now() - timedelta(days=300)).count())"
    )
    assert observed.manage("shell", "--no-imports", "-c", count_old).stdout.strip() == "1"
    # The same task the worker's beat schedule runs hourly, sent through the broker to the worker.
    observed.manage(
        "shell",
        "--no-imports",
        "-c",
        "from analytics.tasks import prune_request_logs; prune_request_logs.delay()",
    )
    wait_until(
        lambda: observed.manage("shell", "--no-imports", "-c", count_old).stdout.strip() == "0",
        timeout=60,
        interval=1,
    )
    assert len(rows(observed)) > 0  # recent rows stay


def test_the_beat_schedule_prunes_hourly():
    from django.conf import settings

    entry = settings.CELERY_BEAT_SCHEDULE["prune-request-analytics"]
    assert entry["task"] == "analytics.prune_request_logs" and entry["schedule"] == 3600.0


@pytest.mark.django_db
def test_the_hourly_rollup_matches_the_rows_it_summarises():
    from analytics import aggregates, rollup
    from analytics.models import RequestLog

    now = datetime(2026, 5, 1, 12, 30, tzinfo=UTC)
    RequestLog.objects.bulk_create(
        [
            RequestLog(
                created_at=now - timedelta(minutes=m),
                model="m",
                key_name="k",
                endpoint="completions",
                status_code=200,
                outcome="ok",
                prompt_tokens=m,
                completion_tokens=2 * m,
                ttft_ms=10.0 * m,
                latency_ms=100.0,
                tokens_per_second=float(m),
            )
            for m in range(1, 121)
        ]
    )
    rollup.add_rows(RequestLog.objects.filter(created_at__gte=now - timedelta(minutes=60)))
    rollup.add_rows(RequestLog.objects.filter(created_at__lt=now - timedelta(minutes=60)))
    incremental = aggregates.totals("day", now=now)
    assert rollup.rebuild() == 3  # 10:00, 11:00 and 12:00
    assert aggregates.totals("day", now=now) == incremental
    assert incremental["requests"] == 120
    assert incremental["prompt_tokens"] == sum(range(1, 121))
    assert incremental["tokens_per_second"] == pytest.approx(60.5)
    # TTFTs 10..1200 ms: the median (600 ms) lies in the (500, 750] bin.
    assert incremental["ttft_p50_ms"] == 750


def test_a_request_with_n_choices_is_recorded_as_its_usage_says(observed):
    reply = observed.openai().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "n choices"}],
        n=3,
        max_tokens=4,
        extra_body=NO_EOS,
    )
    wait_until(lambda: any(r["completion_tokens"] == 12 for r in rows(observed)), timeout=15)
    row = next(r for r in rows(observed) if r["completion_tokens"] == 12)
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens == 12


@pytest.mark.django_db
def test_the_key_admin_lists_each_keys_last_30_days_of_requests_and_tokens(admin_client):
    from django.utils import timezone

    from analytics.models import RequestLog
    from llmservice.models import ApiKey

    busy, _ = ApiKey.generate("busy")
    idle, _ = ApiKey.generate("idle")
    now = timezone.now()

    def row(at, prompt, completion):
        return RequestLog(
            created_at=at,
            api_key=busy,
            key_name="busy",
            endpoint="chat.completions",
            status_code=200,
            outcome="ok",
            prompt_tokens=prompt,
            completion_tokens=completion,
            latency_ms=100.0,
        )

    RequestLog.objects.bulk_create(
        [row(now, 10, 5), row(now - timedelta(days=2), 3, 2), row(now - timedelta(days=40), 99, 99)]
    )
    keys = {k.name: k for k in ApiKey.objects.with_usage()}
    assert (keys["busy"].requests_30d, keys["busy"].tokens_30d) == (2, 20)
    assert (keys["idle"].requests_30d, keys["idle"].tokens_30d) == (0, 0)
    page = admin_client.get(
        "/admin/llmservice/apikey/?o=-9"
    )  # by requests (30 d), most first (0 is the checkbox)
    assert page.status_code == 200
    text = page.content.decode()
    assert '<td class="field-requests_30d">2</td>' in text
    assert '<td class="field-tokens_30d">20</td>' in text
    assert text.index(">busy<") < text.index(">idle<")
    ascending = admin_client.get("/admin/llmservice/apikey/?o=9").content.decode()
    assert ascending.index(">idle<") < ascending.index(">busy<")
