from django.conf import settings
from django.core.management.base import BaseCommand

from analytics.aggregates import prune


class Command(BaseCommand):
    help = (
        "Delete request analytics older than the retention (LLM_SERVICE_ANALYTICS_RETENTION_DAYS)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=None)

    def handle(self, *args, days, **options):
        days = days or settings.ANALYTICS_RETENTION_DAYS
        self.stdout.write(f"Deleted {prune(days)} request rows older than {days} days")
