"""Websocket routes (wired into llmservice.asgi)."""

from __future__ import annotations

from django.urls import path

from llmservice.dashboard.consumers import StatusConsumer

websocket_urlpatterns = [
    path("ws/admin/status/", StatusConsumer.as_asgi()),
]
