"""The admin site: Django's admin plus the dashboard pages, with the Status page as its index.

Made the default `admin.site` by `llmservice.apps.DashboardAdminConfig`, so every app's
`@admin.register` lands here. Views are imported in `get_urls()`: the Celery worker also loads
the admin modules (django.setup) and must not import the inference engine.
"""

from __future__ import annotations

import functools

from django.contrib import admin
from django.urls import path

# (url name, label) of the dashboard pages, in nav order; `index` is the admin's own index.
NAV = [
    ("index", "Status"),
    ("dashboard_models", "Models"),
    ("dashboard_playground", "Playground"),
    ("dashboard_analytics", "Analytics"),
    ("dashboard_settings", "Settings"),
]


class LLMServiceAdminSite(admin.AdminSite):
    site_header = "llm-service"
    site_title = "llm-service"
    index_title = "Status"
    site_url = None  # no public site to link to

    def each_context(self, request):
        context = super().each_context(request)
        context["dashboard_nav"] = NAV
        return context

    def index(self, request, extra_context=None):
        from llmservice.dashboard import views

        request.current_app = self.name
        return views.status_page(request, self)

    def get_urls(self):
        from llmservice.dashboard import views

        def page(view):
            # Each page view gets the site, for `each_context` (nav, sidebar, user tools).
            @functools.wraps(view)
            def bound(request, *args, **kwargs):
                return view(request, self, *args, **kwargs)

            return self.admin_view(bound)

        urls = [
            path("dashboard/status.json", page(views.status_json), name="dashboard_status_json"),
            path("dashboard/models/", page(views.models_page), name="dashboard_models"),
            path(
                "dashboard/models/<int:pk>/<str:action>",
                page(views.model_action),
                name="dashboard_model_action",
            ),
            path(
                "dashboard/downloads/",
                page(views.download_create),
                name="dashboard_download_create",
            ),
            path(
                "dashboard/downloads/<int:pk>/<str:action>",
                page(views.download_action),
                name="dashboard_download_action",
            ),
            path("dashboard/playground/", page(views.playground_page), name="dashboard_playground"),
            path("dashboard/analytics/", page(views.analytics_page), name="dashboard_analytics"),
            path(
                "dashboard/analytics.json",
                page(views.analytics_json),
                name="dashboard_analytics_json",
            ),
            path("dashboard/settings/", page(views.settings_page), name="dashboard_settings"),
            path(
                "dashboard/keys/<int:pk>/revoke",
                page(views.key_revoke),
                name="dashboard_key_revoke",
            ),
        ]
        return urls + super().get_urls()
