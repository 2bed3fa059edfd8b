"""Dashboard login throttling (django-axes)."""

from __future__ import annotations

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
