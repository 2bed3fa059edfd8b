from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class LlmServiceConfig(AppConfig):
    name = "llmservice"
    verbose_name = "Service"
    default = True


class DashboardAdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with our site (the dashboard) as the default `admin.site`.

    Listed in INSTALLED_APPS by its dotted path; `default = False` keeps it from being taken for
    the `llmservice` app's own config.
    """

    default = False
    default_site = "llmservice.admin_site.LLMServiceAdminSite"
