from django.core.management.base import BaseCommand

from analytics.rollup import rebuild


class Command(BaseCommand):
    help = "Recompute the hourly analytics rollup (day/week charts) from the request rows."

    def handle(self, *args, **options):
        self.stdout.write(f"Wrote {rebuild()} hourly rollup rows")
