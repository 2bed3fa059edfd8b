from django.core.management.base import BaseCommand

from llmservice.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("--name", default="cli")

    def handle(self, *args, name, **options):
        _, raw = ApiKey.generate(name)
        self.stdout.write(raw)
