from django import forms
from django.contrib import admin, messages
from django.db import transaction

from models_app import downloads
from models_app.models import Download, LLMModel


@admin.register(LLMModel)
class LLMModelAdmin(admin.ModelAdmin):
    """The registry; the change form is the per-model settings form (load/unload: Models page)."""

    list_display = [
        "name",
        "kind",
        "is_default",
        "status",
        "enabled",
        "pinned",
        "source",
        "size",
        "updated_at",
    ]
    list_filter = ["kind", "status", "enabled", "source", "pinned"]
    search_fields = ["name", "source_ref"]
    readonly_fields = [
        "source",
        "source_ref",
        "revision",
        "path",
        "format",
        "size_bytes",
        "status",
        "is_default",
        "created_at",
        "updated_at",
    ]
    fieldsets = [
        (None, {"fields": ["name", "aliases", "enabled", "is_default", "status"]}),
        ("Embedding model", {"fields": ["kind", "pooling", "normalize"]}),
        (
            "Generation defaults (used when a request leaves them out)",
            {
                "fields": [
                    "default_temperature",
                    "default_top_p",
                    "default_top_k",
                    "default_min_p",
                    "default_max_tokens",
                    "default_presence_penalty",
                    "default_frequency_penalty",
                    "default_repetition_penalty",
                ]
            },
        ),
        (
            "Prompt",
            {
                "fields": [
                    "context_length",
                    "system_prompt",
                    "chat_template",
                    "tool_parser",
                    "reasoning_parser",
                ]
            },
        ),
        ("Serving", {"fields": ["backend", "max_batch_size", "keep_alive_seconds", "pinned"]}),
        (
            "vLLM engine (a change restarts the model's engine)",
            {
                "classes": ["collapse"],
                "fields": [
                    "dtype",
                    "gpu_memory_utilization",
                    "kv_cache_gb",
                    "tensor_parallel_size",
                    "pipeline_parallel_size",
                    "quantization",
                    "enforce_eager",
                    "engine_args",
                ],
            },
        ),
        (
            "Files",
            {
                "fields": [
                    "source",
                    "source_ref",
                    "revision",
                    "path",
                    "format",
                    "size_bytes",
                    "created_at",
                    "updated_at",
                ]
            },
        ),
    ]
    actions = ["make_default", "enable", "disable"]

    def has_add_permission(self, request):
        # Models arrive by download, import_model or the demo import, which also write the files.
        return False

    @admin.display(description="size", ordering="size_bytes")
    def size(self, obj):
        return f"{obj.size_bytes / 1e6:,.0f} MB"

    @admin.action(description="Make the selected model the default")
    def make_default(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model to make default.", messages.ERROR)
            return
        row = queryset.get()
        try:
            row.make_default()
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"{row.name} is now the default model (alias `default`).")

    @admin.action(description="Enable the selected models")
    def enable(self, request, queryset):
        self.message_user(request, f"Enabled {queryset.update(enabled=True)} model(s).")

    @admin.action(description="Disable the selected models (they answer 404)")
    def disable(self, request, queryset):
        self.message_user(request, f"Disabled {queryset.update(enabled=False)} model(s).")


# --- downloads from the Hugging Face hub ---------------------------------------------------------


class DownloadAddForm(forms.ModelForm):
    """Queue a download: repo, revision, file patterns, model name. Saving sends it to the worker."""

    include_patterns = forms.CharField(
        required=False,
        label="Include",
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        help_text="Glob patterns of the files to fetch, one per line or comma-separated. Empty: "
        + ", ".join(downloads.DEFAULT_INCLUDE),
    )
    name = forms.CharField(
        required=False,
        max_length=200,
        help_text="The model name to register (default: the repo id).",
    )

    class Meta:
        model = Download
        fields = ["repo_id", "revision", "name"]

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            repo_id, revision, name = downloads.validate_request(
                data.get("repo_id", ""), data.get("revision", ""), data.get("name")
            )
        except downloads.DownloadError as exc:
            raise forms.ValidationError(str(exc)) from exc
        data.update(repo_id=repo_id, revision=revision, name=name)
        raw = data.get("include_patterns", "").replace(",", "\n")
        self.instance.include = [p.strip() for p in raw.splitlines() if p.strip()]
        return data


@admin.register(Download)
class DownloadAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "repo_id",
        "name",
        "status",
        "progress",
        "speed",
        "eta",
        "files",
        "error_summary",
        "created_at",
    ]
    list_display_links = ["id", "repo_id"]
    list_filter = ["status"]
    search_fields = ["repo_id", "name", "error"]
    actions = ["cancel_downloads", "retry_downloads"]
    detail_fields = [
        "repo_id",
        "revision",
        "commit",
        "include",
        "name",
        "status",
        "progress",
        "bytes_done",
        "bytes_total",
        "speed",
        "eta",
        "files",
        "error",
        "model",
        "cancel_requested",
        "celery_task_id",
        "worker",
        "created_at",
        "started_at",
        "finished_at",
        "updated_at",
    ]

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = DownloadAddForm
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["repo_id", "revision", "include_patterns", "name"]
        return self.detail_fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.detail_fields

    def has_change_permission(self, request, obj=None):
        return False  # rows are written by the worker; the detail page is read-only

    def save_model(self, request, obj, form, change):
        from models_app.tasks import enqueue

        super().save_model(request, obj, form, change)
        if not change:
            enqueue(obj)  # sent when the admin's transaction commits

    @admin.display(description="progress")
    def progress(self, obj):
        return obj.percent_display

    @admin.display(description="rate")
    def speed(self, obj):
        return (
            f"{downloads.human_bytes(obj.rate)}/s" if obj.status == Download.Status.RUNNING else "-"
        )

    @admin.display(description="ETA")
    def eta(self, obj):
        return (
            downloads.human_seconds(obj.eta_seconds)
            if obj.status == Download.Status.RUNNING
            else "-"
        )

    @admin.display(description="files")
    def files(self, obj):
        return f"{obj.files_done}/{obj.files_total}"

    @admin.display(description="error")
    def error_summary(self, obj):
        return obj.error if len(obj.error) <= 100 else obj.error[:99] + "\u2026"

    @admin.action(description="Cancel selected downloads")
    def cancel_downloads(self, request, queryset):
        count = 0
        for row in queryset.filter(status__in=Download.ACTIVE):
            downloads.request_cancel(row.pk)
            count += 1
        self.message_user(
            request, f"Cancel requested for {count} download(s); partial files are deleted."
        )

    @admin.action(description="Retry selected failed or cancelled downloads")
    def retry_downloads(self, request, queryset):
        from models_app.tasks import enqueue

        count = 0
        for row in queryset:
            try:
                with transaction.atomic():
                    enqueue(downloads.prepare_retry(row))
                count += 1
            except downloads.DownloadError as exc:
                self.message_user(request, str(exc), messages.WARNING)
        if count:
            self.message_user(request, f"Re-queued {count} download(s).")
