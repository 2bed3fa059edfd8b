"""Periodic upkeep, run by the Celery worker's beat schedule."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from analytics.aggregates import prune


@shared_task(name="analytics.prune_request_logs")
def prune_request_logs() -> int:
    return prune(settings.ANALYTICS_RETENTION_DAYS)
