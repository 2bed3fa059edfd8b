from django.contrib import admin

from models_app.models import LLMModel


@admin.register(LLMModel)
class LLMModelAdmin(admin.ModelAdmin):
    list_display = ["name", "is_default", "status", "enabled", "source", "size_bytes", "updated_at"]
    list_filter = ["status", "enabled", "source"]
    search_fields = ["name", "source_ref"]
