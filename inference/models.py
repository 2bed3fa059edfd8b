"""Stored responses of /v1/responses (`store: true`): what `previous_response_id` continues and
`GET /v1/responses/{id}` returns, owned by the key that made them."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class StoredResponseQuerySet(models.QuerySet):
    def live(self) -> StoredResponseQuerySet:
        return self.filter(expires_at__gt=timezone.now())

    def owned_by(self, key_id: int | None) -> StoredResponseQuerySet:
        return self.filter(key_id=key_id)  # None: the environment's key


class StoredResponse(models.Model):
    id = models.CharField(primary_key=True, max_length=64)
    # The key that made it; only that key reads, continues or deletes it. Null: the
    # environment's key (LLM_SERVICE_API_KEY).
    key = models.ForeignKey(
        "llmservice.ApiKey", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    model = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(db_index=True)
    # The conversation so far as chat messages (its input, its output), for continuing it
    conversation = models.JSONField(default=list)
    body = models.JSONField()  # the response object as the API returned it

    objects = StoredResponseQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.id
