"""Security: dashboard login throttling (django-axes), security headers and HSTS."""

from __future__ import annotations

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db


def login(client: Client, username: str, password: str):
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password})


def test_repeated_wrong_passwords_lock_the_login_out_even_with_the_right_one(settings):
    get_user_model().objects.create_superuser("operator", "", "right-password")
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):
        assert login(client, "operator", "wrong").status_code == 200  # the form again
    assert login(client, "operator", "wrong").status_code == 429  # the limit: locked out
    response = login(client, "operator", "right-password")
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_a_right_password_before_the_limit_logs_in_and_resets_the_count(settings):
    get_user_model().objects.create_superuser("operator", "", "right-password")
    client = Client()
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):
        login(client, "operator", "wrong")
    assert login(client, "operator", "right-password").status_code == 302
    client.logout()
    for _ in range(settings.LOGIN_FAILURE_LIMIT - 1):
        login(client, "operator", "wrong")
    assert login(client, "operator", "right-password").status_code == 302


def test_responses_carry_nosniff_and_frame_deny():
    response = Client().get("/admin/login/")
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert Client().get("/health")["X-Content-Type-Options"] == "nosniff"


def test_hsts_is_sent_on_https_behind_a_tls_proxy_when_set(settings):
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    secure = Client().get("/health", HTTP_X_FORWARDED_PROTO="https")
    assert secure["Strict-Transport-Security"] == "max-age=3600"
    assert "Strict-Transport-Security" not in Client().get("/health")  # plain HTTP: never


def test_under_asgi_the_dashboard_checks_csrf_and_the_api_sets_no_cookie(mlx_server):
    """The dashboard's middleware (sessions, CSRF, logins) is skipped for /v1 requests, which
    are served on the event loop; the security headers are not."""
    with mlx_server.http() as http:
        models = http.get("/v1/models")
        assert models.status_code == 200
        assert models.headers["X-Content-Type-Options"] == "nosniff"
        assert models.headers["X-Frame-Options"] == "DENY"
        assert "set-cookie" not in models.headers
    with httpx.Client(base_url=mlx_server.url, timeout=30) as browser:
        page = browser.get("/admin/login/")
        assert page.status_code == 200 and "csrftoken" in browser.cookies
        form = {"username": "nobody", "password": "wrong"}
        forged = httpx.post(mlx_server.url + "/admin/login/", data=form, timeout=30)
        assert forged.status_code == 403
        token = browser.cookies["csrftoken"]
        honest = browser.post(
            "/admin/login/",
            data={**form, "csrfmiddlewaretoken": token},
            headers={"Referer": mlx_server.url + "/admin/login/"},
        )
        assert honest.status_code == 200 and "Please enter the correct" in honest.text
