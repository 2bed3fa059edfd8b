"""The admin dashboard in a real browser: Playwright driving Debian's Chromium against a real server.

One `llm-service serve` (tiny model, download worker, pointed at the stand-in hub) for the module;
each test gets a fresh, logged-in browser context whose console errors fail the test. Screenshots
of each page go to docs/screenshots/.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.helpers import API_KEY, ROOT, Server, wait_until
from tests.hub_server import HubServer
from tests.test_chat_completions import NO_EOS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}
SHOTS = ROOT / "docs" / "screenshots"
USER, PASSWORD = "operator", "operator-pw-4321"
REPO = "test-org/tiny"
SMOLLM = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tiny_dir: Path):
    server = HubServer({REPO: tiny_dir}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dash(tmp_path_factory, tiny_dir: Path, tiny2_dir: Path, smollm_dir: Path, hub: HubServer):
    data = tmp_path_factory.mktemp("dashboard")
    models = [("tiny", tiny_dir, True), ("tiny2", tiny2_dir, False), (SMOLLM, smollm_dir, False)]
    server = Server(
        data,
        models=models,
        env={
            "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(data / "hf-home"),
        },
    )
    server.start()
    server.manage("createsuperuser", "--noinput", "--username", USER, "--email", "op@example.com")
    wait_until(lambda: "tiny" in server.loaded_models(), timeout=30)  # the default model preloads
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def login_state(browser, dash: Server) -> dict:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(dash.url + "/admin/")
    page.fill("#id_username", USER)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("h1")).to_have_text("Status")
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def page(browser, login_state: dict, dash: Server):
    """A logged-in page; any console error or uncaught exception on it fails the test."""
    context = browser.new_context(viewport=VIEWPORT, storage_state=login_state, base_url=dash.url)
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console",
        lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    yield page
    context.close()
    assert not errors, "errors in the browser console:\n" + "\n".join(errors)


def screenshot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def number(page: Page, selector: str) -> float:
    text = page.locator(selector).inner_text().replace(",", "").strip()
    return float(text) if text not in ("", "-", "…") else 0.0


def stream_in_background(server: Server, stop: threading.Event) -> threading.Thread:
    """A long streamed chat that runs until `stop` is set (then the client disconnects)."""

    def run() -> None:
        with server.chat_stream("go", 1800, **NO_EOS) as events:
            for _ in events:
                if stop.is_set():
                    break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --- login and pages --------------------------------------------------------------------------------


def test_the_dashboard_needs_a_staff_login_and_so_does_its_websocket(browser, dash):
    context = browser.new_context(viewport=VIEWPORT, base_url=dash.url)
    page = context.new_page()
    try:
        page.goto("/admin/")
        assert "/admin/login/" in page.url
        screenshot(page, "login")
        for path in (
            "/admin/dashboard/status.json",
            "/admin/dashboard/models/",
            "/admin/dashboard/analytics.json",
        ):
            response = httpx.get(dash.url + path, follow_redirects=False)
            assert (
                response.status_code == 302 and "/admin/login/" in response.headers["location"]
            ), path
        # An anonymous websocket is refused at the handshake (this page's console error is expected).
        outcome = page.evaluate("""() => new Promise((resolve) => {
            const ws = new WebSocket(`ws://${location.host}/ws/admin/status/`);
            ws.onopen = () => resolve("open");
            ws.onclose = (event) => resolve("closed");
        })""")
        assert outcome == "closed"

        page.fill("#id_username", USER)
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        expect(page.locator("h1")).to_have_text("Status")
        assert page.url.rstrip("/").endswith("/admin")
    finally:
        context.close()


def test_every_page_opens_without_console_errors_with_the_nav_and_admin_look(page, dash):
    pages = {
        "Status": "/admin/",
        "Models": "/admin/dashboard/models/",
        "Playground": "/admin/dashboard/playground/",
        "Analytics": "/admin/dashboard/analytics/",
        "Settings": "/admin/dashboard/settings/",
        "Models admin": "/admin/models_app/llmmodel/",
    }
    for title, path in pages.items():
        response = page.goto(path)
        # A Content-Security-Policy, and nothing on the page breaks it (the fixture fails on
        # console errors, which is where the browser reports violations).
        assert "script-src 'self'" in response.headers["content-security-policy"]
        nav = page.locator("#dashboard-nav a")
        expect(nav).to_have_text(["Status", "Models", "Playground", "Analytics", "Settings"])
        expect(page.locator("#site-name")).to_have_text("llm-service")
        if title != "Models admin":
            expect(page.locator("h1")).to_have_text(title)
            expect(page.locator("#dashboard-nav a.active")).to_have_text(title)
            assert "llm-dashboard" in (page.locator("body").get_attribute("class") or "")
    # The admin's own pages keep working on our site: the model's change form is its settings form.
    page.goto("/admin/dashboard/models/")
    page.click("#registry tr[data-model=tiny] a:text('Settings')")
    expect(page.locator("h1")).to_have_text("Change model")


# --- status -----------------------------------------------------------------------------------------


def test_status_shows_the_loaded_model_and_updates_live_while_a_request_runs(page, dash):
    page.goto("/admin/")
    expect(page.locator("#live-transport")).to_have_text("websocket")
    expect(page.locator("#loaded-models tr[data-model=tiny]")).to_be_visible()
    expect(page.locator("#loaded-models tr[data-model=tiny] td").nth(1)).to_have_text("mlx")
    expect(page.locator("[data-field=backend]")).to_have_text("mlx")
    expect(page.locator("[data-field=device]")).to_have_text("cpu")
    expect(page.locator("[data-field=default_model]")).to_contain_text("tiny — preload ready")
    expect(page.locator("[data-field=version]")).not_to_be_empty()
    before = number(page, "[data-field=tokens_generated]")

    stop = threading.Event()
    thread = stream_in_background(dash, stop)
    try:
        # Without reloading: the running count, the token counter and the token rate move.
        expect(page.locator("[data-field=running]")).to_have_text("1", timeout=10_000)
        page.wait_for_function(
            "() => parseFloat(document.querySelector('[data-field=tokens_per_second]').textContent) > 0"
        )
        page.wait_for_function(
            f"() => parseFloat(document.querySelector('[data-field=tokens_generated]').textContent"
            f".replace(/,/g, '')) >= {before + 50}"
        )
        expect(page.locator("#loaded-models tr[data-model=tiny] td").nth(3)).to_have_text("1")
        screenshot(page, "status")
    finally:
        stop.set()
        thread.join(30)
    expect(page.locator("[data-field=running]")).to_have_text("0", timeout=10_000)


def test_status_falls_back_to_polling_when_websockets_are_unavailable(page, dash):
    page.add_init_script("delete window.WebSocket")
    page.goto("/admin/")
    expect(page.locator("#live-transport")).to_have_text("polling")
    expect(page.locator("#loaded-models tr[data-model=tiny]")).to_be_visible()
    before = number(page, "[data-field=tokens_generated]")
    dash.openai().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=20, extra_body=NO_EOS
    )
    page.wait_for_function(
        f"() => parseFloat(document.querySelector('[data-field=tokens_generated]').textContent"
        f".replace(/,/g, '')) >= {before + 20}"
    )


# --- models -----------------------------------------------------------------------------------------


def test_models_page_loads_unloads_and_sets_the_default_model(page, dash):
    page.goto("/admin/dashboard/models/")
    row = page.locator("#registry tr[data-model=tiny2]")
    expect(row.locator(".backend-cell")).to_have_text("auto")
    expect(row.locator(".loaded-cell")).to_have_attribute("data-loaded", "no")
    row.locator(".load-form button").click()
    expect(page.locator(".messagelist")).to_contain_text("Model tiny2 is loaded")
    expect(row.locator(".loaded-cell")).to_have_attribute("data-loaded", "yes")
    assert "tiny2" in dash.loaded_models()

    row.locator(".unload-form button").click()
    expect(page.locator(".messagelist")).to_contain_text("Model tiny2 was unloaded")
    expect(row.locator(".loaded-cell")).to_have_attribute("data-loaded", "no")
    assert "tiny2" not in dash.loaded_models()

    row.locator("button:text-is('Set default')").click()
    expect(page.locator(".messagelist")).to_contain_text("Model tiny2 is now the default")
    reply = dash.openai().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert reply.model == "tiny2"
    page.locator("#registry tr[data-model=tiny] button:text-is('Set default')").click()
    expect(page.locator(".messagelist")).to_contain_text("Model tiny is now the default")


def test_a_download_shows_live_progress_and_can_be_cancelled_and_retried(page, dash, hub):
    hub.reset()
    hub.throttle = 3_000_000  # bytes/s: about 5 s for the 16 MB model
    try:
        page.goto("/admin/dashboard/models/")
        page.fill("#id_repo_id", REPO)
        page.fill("#id_name", "tiny-hub")
        page.click("#download-form input[type=submit]")
        expect(page.locator(".messagelist")).to_contain_text(
            "queued: test-org/tiny@main -> model tiny-hub"
        )
        row = page.locator("#downloads tr[data-download]").first
        expect(row).to_contain_text("tiny-hub")
        # The bar moves while bytes flow: several distinct percentages, with a rate and an ETA.
        seen = set()

        def progressing() -> bool:
            value = row.locator(".dash-progress").get_attribute("data-percent")
            if value and 0 < float(value) < 100:
                seen.add(value)
            return len(seen) >= 3

        wait_until(progressing, timeout=20, interval=0.2)
        expect(row.locator(".dl-rate")).to_contain_text("/s")
        expect(row.locator(".dl-status")).to_contain_text("running")
        page.evaluate("window.scrollTo(0, 0)")
        screenshot(page, "models")

        page.once("dialog", lambda dialog: dialog.accept())
        row.locator(".cancel-form button").click()
        expect(page.locator(".messagelist")).to_be_visible()
        expect(row.locator(".dl-status")).to_contain_text("cancelled", timeout=15_000)
        expect(row.locator(".retry-form")).to_be_visible()

        hub.throttle = 8_000_000  # slow enough to see it finish on this page
        row.locator(".retry-form button").click()
        expect(page.locator(".messagelist")).to_contain_text("re-queued")
        expect(row.locator(".dl-status")).to_contain_text("completed", timeout=30_000)
        expect(row.locator(".dash-progress")).to_have_attribute("data-percent", "100.0")
        expect(page.locator("#models-changed")).to_be_visible()
        page.reload()
        expect(page.locator("#registry tr[data-model=tiny-hub]")).to_be_visible()
    finally:
        hub.reset()


# --- playground -------------------------------------------------------------------------------------


def _chat(page: Page, message: str, max_tokens: int) -> None:
    page.fill("#pg-max-tokens", str(max_tokens))
    page.fill("#pg-extra", json.dumps(NO_EOS))
    page.fill("#pg-message", message)
    page.click("#pg-send")


def test_the_playground_streams_a_reply_token_by_token_through_the_api(page, dash):
    page.goto("/admin/dashboard/playground/")
    expect(page.locator("#pg-model")).to_have_value("tiny")
    page.fill("#pg-system", "You are terse.")
    # Record the reply's length at every DOM change: a streamed reply grows in many steps.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.chat-assistant .chat-text');
            if (reply) window.__lengths.push(reply.textContent.length);
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    _chat(page, "Tell me a story", 120)
    reply = page.locator(".chat-assistant").last
    expect(reply).to_have_attribute("data-done", "finish: length", timeout=30_000)
    lengths = page.evaluate("window.__lengths")
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 10, lengths  # rendered piece by piece, not all at once
    assert int(reply.get_attribute("data-chunks")) >= 10
    stats = page.locator("#pg-stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats and "120 tokens" in stats, stats
    expect(page.locator("#pg-send")).to_be_enabled()

    # The key the page used is the user's short-lived playground key.
    keys = dash.manage(
        "shell",
        "--no-imports",
        "-c",
        "from llmservice.models import ApiKey; "
        f"print([(k.name, k.is_active) for k in ApiKey.objects.filter(name='playground:{USER}')])",
    ).stdout
    assert keys.count("True") == 1, keys  # reopening the page replaced the older ones


def test_the_playground_chats_with_the_real_model(page, dash):
    page.goto("/admin/dashboard/playground/")
    page.select_option("#pg-model", SMOLLM)
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "40")
    page.fill("#pg-message", "What is the capital of France? Answer in one sentence.")
    page.click("#pg-send")
    reply = page.locator(".chat-assistant").last
    expect(reply).to_have_attribute("data-done", "finish: stop", timeout=60_000)
    expect(reply.locator(".chat-text")).to_contain_text("Paris")
    screenshot(page, "playground")


def test_stop_in_the_playground_aborts_the_stream_and_frees_the_sequence_on_the_server(page, dash):
    page.goto("/admin/dashboard/playground/")
    # The real model: 1,800 tokens take it minutes here, the tiny one can finish them before Stop.
    page.select_option("#pg-model", SMOLLM)
    _chat(page, "Go on forever", 1800)
    reply = page.locator(".chat-assistant .chat-text").last
    expect(reply).not_to_be_empty(timeout=15_000)
    wait_until(lambda: dash.metric("llm_running_sequences") == 1, timeout=10)
    page.click("#pg-stop-button")
    expect(page.locator(".chat-assistant").last).to_have_attribute("data-done", "stopped")
    started = time.monotonic()
    wait_until(lambda: dash.metric("llm_running_sequences") == 0, timeout=30, interval=0.1)
    assert time.monotonic() - started < 3
    length = len(reply.inner_text())
    time.sleep(0.5)
    assert len(reply.inner_text()) == length  # nothing arrives after Stop
    expect(page.locator("#pg-send")).to_be_enabled()


# --- settings: API keys -------------------------------------------------------------------------------


def test_a_key_created_in_settings_is_shown_once_works_and_is_refused_once_revoked(page, dash):
    page.goto("/admin/dashboard/settings/")
    expect(page.locator("[data-config=LLM_SERVICE_BACKEND]")).to_have_text("auto")
    expect(page.locator("[data-config=LLM_SERVICE_METRICS_TOKEN]")).to_contain_text("not set")
    expect(page.locator("[data-config=LLM_SERVICE_API_KEY]")).to_have_text("set")
    assert API_KEY not in page.content()  # values of secrets are never shown

    page.fill("#id_name", "ci-key")
    page.check("#key-form input[name=allowed_models][value=tiny]")
    page.fill("#id_rpm_limit", "100")
    page.click("#key-form input[type=submit]")
    secret = page.locator("#new-key-secret").inner_text().strip()
    assert secret.startswith("sk-llm-")
    expect(page.locator("#keys tr[data-key=ci-key]")).to_contain_text("tiny")

    client = openai.OpenAI(base_url=dash.url + "/v1", api_key=secret, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]

    page.goto("/admin/dashboard/settings/")
    assert secret not in page.content()  # shown once
    expect(page.locator("#new-key-secret")).to_have_count(0)
    screenshot(page, "settings")

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#keys tr[data-key=ci-key] button:text-is('Revoke')").click()
    expect(page.locator(".messagelist")).to_contain_text("revoked")
    expect(page.locator("#keys tr[data-key=ci-key] .key-state")).to_have_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# --- analytics ----------------------------------------------------------------------------------------


def test_a_request_appears_in_analytics_with_charts_drawn(page, dash):
    code = "from llmservice.models import ApiKey; k, raw = ApiKey.generate('analytics-probe'); print(raw)"
    key = dash.manage("shell", "--no-imports", "-c", code).stdout.strip()
    client = openai.OpenAI(base_url=dash.url + "/v1", api_key=key, max_retries=0)
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        extra_body=NO_EOS,
    )

    page.goto("/admin/dashboard/analytics/")
    recent = page.locator("#recent tbody")

    def shown() -> bool:
        # The recent rows and the by-key table are separate queries: refresh until both have it.
        if "analytics-probe" in recent.inner_text() and "analytics-probe" in (
            page.locator("#by-key").inner_text()
        ):
            return True
        page.click("#refresh")  # rows are written soon after the request (a batched recorder)
        page.wait_for_timeout(300)
        return False

    wait_until(shown, timeout=60, interval=0.2)
    row = recent.locator("tr", has_text="analytics-probe").first
    expect(row).to_contain_text("chat.completions")
    expect(row).to_contain_text("tiny")
    expect(page.locator("#by-key")).to_contain_text("analytics-probe")
    expect(page.locator("#by-model")).to_contain_text("tiny")
    assert number(page, "[data-total=requests]") >= 1

    drawn = page.evaluate("""() => ['chart-requests', 'chart-tokens', 'chart-tps', 'chart-ttft', 'chart-errors']
        .map((id) => {
            const chart = window.Chart.getChart(document.getElementById(id));
            return chart ? [chart.data.labels.length, chart.data.datasets[0].data.some((v) => v > 0)] : null;
        })""")
    assert all(d is not None and d[0] >= 60 for d in drawn), drawn  # one point per minute
    assert drawn[0][1] and drawn[1][1], drawn  # requests and tokens have a non-zero point
    screenshot(page, "analytics")

    page.select_option("#window", "day")
    page.wait_for_function(
        "() => window.Chart.getChart(document.getElementById('chart-requests'))"
        ".data.labels.length <= 25"
    )
    assert "window=day" in page.url


OPEN_STATUS_SOCKET = """(url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    ws.onopen = () => { ws.close(); resolve("open"); };
    ws.onclose = () => resolve("closed");
})"""


def test_the_status_websocket_refuses_other_origins_and_non_staff_sessions(
    browser, login_state, dash
):
    socket_url = dash.url.replace("http://", "ws://") + "/ws/admin/status/"
    # Another site on this host (another port: same site, so the staff session cookie goes along).
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    context = browser.new_context(storage_state=login_state)
    try:
        page = context.new_page()
        page.goto(dash.url + "/admin/")
        assert page.evaluate(OPEN_STATUS_SOCKET, socket_url) == "open"
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
        assert page.evaluate(OPEN_STATUS_SOCKET, socket_url) == "closed"
    finally:
        context.close()
        other.shutdown()

    # A logged-in user who is not staff (a session made directly: the admin login refuses them).
    session = dash.manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.contrib.auth import get_user_model, SESSION_KEY, BACKEND_SESSION_KEY, "
        "HASH_SESSION_KEY; from django.contrib.sessions.backends.db import SessionStore; "
        "u = get_user_model().objects.create_user('visitor', password='visitor-pw-1'); "
        "s = SessionStore(); s[SESSION_KEY] = str(u.pk); "
        "s[BACKEND_SESSION_KEY] = 'django.contrib.auth.backends.ModelBackend'; "
        "s[HASH_SESSION_KEY] = u.get_session_auth_hash(); s.create(); print(s.session_key)",
    ).stdout.strip()
    context = browser.new_context()
    try:
        context.add_cookies([{"name": "sessionid", "value": session, "url": dash.url}])
        page = context.new_page()
        page.goto(dash.url + "/health")
        assert page.evaluate(OPEN_STATUS_SOCKET, socket_url) == "closed"
    finally:
        context.close()


def test_every_dashboard_action_needs_a_csrf_token(login_state, dash):
    cookies = {c["name"]: c["value"] for c in login_state["cookies"]}
    actions = [
        "/admin/dashboard/models/1/load",
        "/admin/dashboard/models/1/unload",
        "/admin/dashboard/downloads/",
        "/admin/dashboard/downloads/1/cancel",
        "/admin/dashboard/settings/",
        "/admin/dashboard/keys/1/revoke",
        "/admin/models_app/llmmodel/1/change/",
        "/admin/llmservice/apikey/add/",
        "/admin/logout/",
    ]
    with httpx.Client(base_url=dash.url, cookies={"sessionid": cookies["sessionid"]}) as client:
        assert client.get("/admin/").status_code == 200  # the session itself is good
        for path in actions:
            response = client.post(path, data={"name": "x"})
            assert response.status_code == 403 and "CSRF" in response.text, path
