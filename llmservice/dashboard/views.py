"""Dashboard pages, mounted on the admin site (llmservice.admin_site): thin sync views.

Each view gets `(request, site, ...)`; `site.admin_view` has already checked for a staff login.
Buttons that change things also check the matching model permission.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from analytics.aggregates import WINDOWS
from llmservice.dashboard import actions, charts, config, status
from llmservice.dashboard.forms import ApiKeyForm, DownloadForm
from llmservice.models import ApiKey
from models_app.models import Download, LLMModel


def _page(request, site, template: str, title: str, **context) -> TemplateResponse:
    request.current_app = site.name
    return TemplateResponse(
        request,
        f"admin/dashboard/{template}",
        {**site.each_context(request), "title": title, **context},
    )


def _require(request, perm: str) -> None:
    if not request.user.has_perm(perm):
        raise PermissionDenied(f"needs the {perm} permission")


# --- Status -------------------------------------------------------------------------------------


def status_page(request, site):
    return _page(request, site, "status.html", "Status", snapshot=status.snapshot())


def status_json(request, site):
    return JsonResponse(status.snapshot())


# --- Models and downloads -------------------------------------------------------------------------


def models_page(request, site, download_form: DownloadForm | None = None):
    snap = status.snapshot()
    memory = {m["name"]: m["memory_bytes"] for m in snap["loaded_models"]}
    rows = [
        {
            "row": row,
            "loaded": row.name in memory,
            "memory_bytes": memory.get(row.name),
            "loading": row.name in snap["loading_models"],
            "load_error": actions.load_error(row.name),
        }
        for row in LLMModel.objects.all()
    ]
    return _page(
        request,
        site,
        "models.html",
        "Models",
        models=rows,
        downloads=snap["downloads"],
        form=download_form or DownloadForm(),
        snapshot=snap,
        can_change=request.user.has_perm("models_app.change_llmmodel"),
        can_download=request.user.has_perm("models_app.add_download"),
    )


@require_POST
def model_action(request, site, pk: int, action: str):
    _require(request, "models_app.change_llmmodel")
    row = get_object_or_404(LLMModel, pk=pk)
    try:
        if action == "load":
            state = actions.load_model(row)
            if state == "loaded":
                messages.success(request, f"Model {row.name} is loaded.")
            else:
                messages.info(
                    request, f"Model {row.name} is loading; this page shows when it is resident."
                )
        elif action == "unload":
            if actions.unload_model(row.name):
                messages.success(request, f"Model {row.name} was unloaded.")
            else:
                messages.info(request, f"Model {row.name} was not loaded.")
        elif action == "default":
            try:
                row.make_default()
            except ValueError as exc:
                messages.error(request, str(exc))
            else:
                messages.success(
                    request,
                    f'Model {row.name} is now the default (what `model: "default"` means).',
                )
        else:
            raise Http404(f"unknown action {action}")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect("admin:dashboard_models")


@require_POST
def download_create(request, site):
    _require(request, "models_app.add_download")
    form = DownloadForm(request.POST)
    if not form.is_valid():
        return models_page(request, site, download_form=form)
    data = form.cleaned_data
    try:
        row = actions.start_download(
            data["repo_id"], data["revision"], data["include"], data["name"]
        )
    except actions.ActionError as exc:
        form.add_error(None, str(exc))
        return models_page(request, site, download_form=form)
    if row.status == Download.Status.FAILED:
        messages.error(request, f"Download {row.pk} failed: {row.error}")
    else:
        messages.success(
            request, f"Download {row.pk} queued: {row.repo_id}@{row.revision} -> model {row.name}."
        )
    return redirect(reverse("admin:dashboard_models") + "#downloads")


@require_POST
def download_action(request, site, pk: int, action: str):
    _require(request, "models_app.add_download")
    try:
        if action == "cancel":
            row = actions.cancel_download(pk)
            if row.status == Download.Status.CANCELLED:
                messages.success(
                    request, f"Download {pk} cancelled; its partial files are deleted."
                )
            elif row.status in Download.ACTIVE:
                messages.info(
                    request,
                    f"Download {pk}: cancel requested; the worker stops it at its "
                    "next progress update.",
                )
            else:
                messages.warning(request, f"Download {pk} already {row.status}; nothing to cancel.")
        elif action == "retry":
            row = actions.retry_download(pk)
            messages.success(request, f"Download {pk} re-queued.")
        else:
            raise Http404(f"unknown action {action}")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect(reverse("admin:dashboard_models") + "#downloads")


# --- Playground -----------------------------------------------------------------------------------


def playground_page(request, site):
    chat_models = LLMModel.objects.servable().filter(kind=LLMModel.Kind.CHAT)  # no embedders
    models = list(chat_models.values_list("name", "is_default"))
    default = next((name for name, is_default in models if is_default), None)
    return _page(
        request,
        site,
        "playground.html",
        "Playground",
        models=[name for name, _ in models],
        default_model=default,
        api_key=actions.playground_key(request.user.get_username()),
        key_hours=int(actions.PLAYGROUND_KEY_TTL.total_seconds() // 3600),
    )


# --- Analytics ------------------------------------------------------------------------------------


def _window(request) -> str:
    window = request.GET.get("window", "hour")
    if window not in WINDOWS:
        raise Http404(f"window must be one of {', '.join(WINDOWS)}")
    return window


def analytics_page(request, site):
    return _page(
        request,
        site,
        "analytics.html",
        "Analytics",
        window=_window(request),
        windows=[("hour", "Last hour"), ("day", "Last day"), ("week", "Last week")],
    )


def analytics_json(request, site):
    return JsonResponse(charts.analytics_data(_window(request)))


# --- Settings: API keys and the effective configuration --------------------------------------------


def _keys() -> tuple[list[ApiKey], int]:
    """Keys with their 30-day usage; playground keys once replaced or expired are only counted."""
    retired = Q(name__startswith=actions.PLAYGROUND_PREFIX) & (
        Q(revoked_at__isnull=False) | Q(expires_at__lte=timezone.now())
    )
    keys = ApiKey.objects.exclude(retired).with_usage()
    return list(keys), ApiKey.objects.filter(retired).count()


def settings_page(request, site):
    form, created = None, None
    if request.method == "POST":
        _require(request, "llmservice.add_apikey")
        form = ApiKeyForm(request.POST)
        if form.is_valid():
            with transaction.atomic():
                key, secret = form.create()
            # The secret is in this response only: never stored, never in a session or message.
            created = {"key": key, "secret": secret}
            form = None
    elif request.method != "GET":
        return HttpResponseBadRequest("GET or POST")
    keys, hidden = _keys()
    return _page(
        request,
        site,
        "settings.html",
        "Settings",
        keys=keys,
        hidden_playground_keys=hidden,
        form=form or ApiKeyForm(),
        created=created,
        config=config.effective(),
        api_base=request.build_absolute_uri("/v1"),
        can_add_key=request.user.has_perm("llmservice.add_apikey"),
        can_revoke=request.user.has_perm("llmservice.change_apikey"),
    )


@require_POST
def key_revoke(request, site, pk: int):
    _require(request, "llmservice.change_apikey")
    try:
        key = actions.revoke_key(pk)
        messages.success(request, f"API key {key} revoked: it is refused from now on.")
    except actions.ActionError as exc:
        messages.error(request, str(exc))
    return redirect(reverse("admin:dashboard_settings") + "#keys")
