from django.core.management.base import BaseCommand

from models_app.downloads import human_bytes
from models_app.models import LLMModel


class Command(BaseCommand):
    help = "List the registered models."

    def handle(self, *args, **options):
        header = ("ID", "NAME", "DEFAULT", "STATUS", "SIZE", "SOURCE", "PATH")
        rows = [
            (
                str(m.pk),
                m.name,
                "*" if m.is_default else "",
                m.status,
                human_bytes(m.size_bytes),
                f"hf:{m.source_ref}" if m.source == LLMModel.Source.HUGGINGFACE else m.source,
                m.path,
            )
            for m in LLMModel.objects.order_by("name")
        ]
        if not rows:
            self.stdout.write("No models registered (import_model or pull_model adds one).")
            return
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for r in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            self.stdout.write("  ".join([*cells, r[-1]]).rstrip())
