from django.contrib import admin

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
        return super().get_queryset(request).with_usage()

    @admin.display(description="requests (30 d)", ordering="requests_30d")
    def requests_30d(self, obj):
        return obj.requests_30d

    @admin.display(description="tokens (30 d)", ordering="tokens_30d")
    def tokens_30d(self, obj):
        return obj.tokens_30d

    def has_add_permission(self, request):
        # Keys are created where the secret can be shown once: the dashboard or create_api_key.
        return False
