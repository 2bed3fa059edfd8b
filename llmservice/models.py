"""API keys. Secrets are shown once at creation and stored only as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets

from django.db import models
from django.utils import timezone

KEY_PREFIX = "sk-llm-"


def hash_key(raw: str) -> str:
    # Keys are 256-bit random tokens, so a fast digest is enough (no password stretching needed).
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def active(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True)

    def with_usage(self, days: int = 30) -> ApiKeyQuerySet:
        """Annotated with `requests_30d` and `tokens_30d`: the key's requests in the last `days`."""
        recent = models.Q(requests__created_at__gte=timezone.now() - timezone.timedelta(days=days))
        return self.annotate(
            requests_30d=models.Count("requests", filter=recent),
            tokens_30d=models.Sum("requests__prompt_tokens", filter=recent, default=0)
            + models.Sum("requests__completion_tokens", filter=recent, default=0),
        )


class ApiKey(models.Model):
    name = models.CharField(max_length=100)
    prefix = models.CharField(
        max_length=16, help_text="First characters of the key, to recognise it."
    )
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Model ids this key may use. Empty: all models."
    )
    rpm_limit = models.PositiveIntegerField(
        null=True, blank=True, verbose_name="requests per minute", help_text="Empty: unlimited."
    )
    tpm_limit = models.PositiveIntegerField(
        null=True, blank=True, verbose_name="tokens per minute", help_text="Empty: unlimited."
    )

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def generate(cls, name: str) -> tuple[ApiKey, str]:
        """Create a key; returns the row and the secret, which is not stored anywhere."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            name=name, prefix=raw[: len(KEY_PREFIX) + 4], hashed_key=hash_key(raw)
        )
        return key, raw

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > timezone.now()
        )
