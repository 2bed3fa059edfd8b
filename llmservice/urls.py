from django.contrib import admin
from django.urls import path

from analytics.metrics import metrics_view
from llmservice.api import api
from llmservice.views import health, ready

urlpatterns = [
    path("v1/", api.urls),
    path("health", health, name="health"),
    path("ready", ready, name="ready"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
]
