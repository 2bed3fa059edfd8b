# The Celery app is loaded with Django so that `shared_task`s bind to it (standard Django + Celery).
from llmservice.celery import app as celery_app

__all__ = ("celery_app",)
