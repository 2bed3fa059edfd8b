import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from models_app.models import LLMModel


class Command(BaseCommand):
    help = (
        "Unregister a model and, when its folder is under MODELS_DIR (downloaded or converted by "
        "us), delete its files. A running server drops the model at its next request for it, "
        "since the row is gone."
    )

    def add_arguments(self, parser):
        parser.add_argument("model", help="the model's id (see list_models) or name")
        parser.add_argument(
            "--force",
            action="store_true",
            help="also remove the default model (leaving no default)",
        )

    def handle(self, *args, model, force, **options):
        rows = (
            LLMModel.objects.filter(pk=int(model)) if model.isdigit() else LLMModel.objects.none()
        )
        row = rows.first() or LLMModel.objects.filter(name=model).first()
        if row is None:
            raise CommandError(f"no model with id or name {model!r} (see `manage.py list_models`)")
        if row.is_default and not force:
            others = LLMModel.objects.exclude(pk=row.pk).count()
            hint = "make another model the default in the admin first, or " if others else ""
            raise CommandError(
                f"{row.name} is the default model: {hint}pass --force to remove it anyway"
            )

        path = Path(row.path).expanduser().resolve()
        models_dir = Path(settings.MODELS_DIR).resolve()
        owned = path != models_dir and path.is_relative_to(models_dir)
        if owned and path.is_file() and path.parent.parent == models_dir:
            path = path.parent  # a downloaded GGUF: its download's folder goes with it
        with transaction.atomic():
            shared = LLMModel.objects.exclude(pk=row.pk).filter(path=row.path).exists()
            row.delete()
        if owned and not shared and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            self.stdout.write(f"Removed model {row.name} and deleted {path}")
        else:
            self.stdout.write(f"Removed model {row.name} (files left in place: {path})")
        if row.is_default:
            self.stdout.write(
                "There is no default model now; `default` answers 404 until you set one."
            )
