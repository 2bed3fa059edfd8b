from django.apps import AppConfig


class LlmServiceConfig(AppConfig):
    name = "llmservice"
    verbose_name = "Service"
