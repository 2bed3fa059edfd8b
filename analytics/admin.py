from django.contrib import admin

from analytics.models import RequestLog


@admin.register(RequestLog)
class RequestLogAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "endpoint",
        "model",
        "key_name",
        "status_code",
        "outcome",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "latency_ms",
        "tokens_per_second",
    ]
    list_filter = ["outcome", "endpoint", "model", "stream"]
    search_fields = ["model", "key_name"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
