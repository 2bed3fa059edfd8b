"""One row per API request: who, which model, how much, how fast, how it ended."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class RequestLog(models.Model):
    class Outcome(models.TextChoices):
        OK = "ok", "Completed"
        CLIENT_ERROR = "client_error", "Client error"
        SERVER_ERROR = "server_error", "Server error"
        CANCELLED = "cancelled", "Cancelled"

    ERROR_OUTCOMES = (Outcome.CLIENT_ERROR, Outcome.SERVER_ERROR)

    created_at = models.DateTimeField(default=timezone.now)
    api_key = models.ForeignKey(
        "llmservice.ApiKey",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="requests",
    )
    key_name = models.CharField(max_length=100, blank=True, help_text="Kept if the key is deleted.")
    model = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=100)
    stream = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error_type = models.CharField(max_length=64, blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    ttft_ms = models.FloatField(null=True, blank=True, verbose_name="TTFT (ms)")
    latency_ms = models.FloatField(verbose_name="latency (ms)")
    queue_ms = models.FloatField(null=True, blank=True, verbose_name="queue wait (ms)")
    tokens_per_second = models.FloatField(null=True, blank=True, verbose_name="decode tok/s")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "request"
        indexes = [
            models.Index(fields=["created_at"], name="reqlog_created"),
            models.Index(fields=["model", "created_at"], name="reqlog_model_created"),
            models.Index(fields=["api_key", "created_at"], name="reqlog_key_created"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.model} {self.status_code}"


class RequestHour(models.Model):
    """Requests rolled up per hour, model and key: what day and week charts read.

    Kept up to date by the recorder as it writes RequestLog rows (and rebuilt from them by
    `manage.py rebuild_analytics_rollup`), so a week's chart reads ~a thousand rows, not millions.
    """

    hour = models.DateTimeField()
    model = models.CharField(max_length=200, blank=True)
    key_name = models.CharField(max_length=100, blank=True)
    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    tps_sum = models.FloatField(default=0)
    tps_n = models.PositiveIntegerField(default=0)
    ttft_sum = models.FloatField(default=0)
    ttft_n = models.PositiveIntegerField(default=0)
    latency_sum = models.FloatField(default=0)
    ttft_bins = models.JSONField(default=list, help_text="Counts per TTFT histogram bin.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hour", "model", "key_name"], name="reqhour_unique")
        ]
        indexes = [models.Index(fields=["hour"], name="reqhour_hour")]
