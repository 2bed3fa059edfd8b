from django.contrib import admin
from django.db.models import Count, Q, Sum
from django.utils import timezone

from llmservice.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "rpm_limit",
        "tpm_limit",
        "requests_30d",
        "tokens_30d",
    ]
    readonly_fields = ["prefix", "created_at", "last_used_at"]
    fields = [
        "name",
        "prefix",
        "allowed_models",
        "rpm_limit",
        "tpm_limit",
        "expires_at",
        "revoked_at",
        "created_at",
        "last_used_at",
    ]
    search_fields = ["name", "prefix"]

    def get_queryset(self, request):
        since = timezone.now() - timezone.timedelta(days=30)
        recent = Q(requests__created_at__gte=since)
        return (
            super()
            .get_queryset(request)
            .annotate(
                _requests=Count("requests", filter=recent),
                _tokens=Sum("requests__prompt_tokens", filter=recent, default=0)
                + Sum("requests__completion_tokens", filter=recent, default=0),
            )
        )

    @admin.display(description="requests (30 d)", ordering="_requests")
    def requests_30d(self, obj):
        return obj._requests

    @admin.display(description="tokens (30 d)", ordering="_tokens")
    def tokens_30d(self, obj):
        return obj._tokens

    def has_add_permission(self, request):
        # Keys are created where the secret can be shown once: the dashboard or create_api_key.
        return False
