from django.core.management.base import BaseCommand, CommandError

from models_app.importing import ImportError_, import_model


class Command(BaseCommand):
    help = (
        "Register an mlx-lm/HF model folder, or a .gguf file: as it is for llama.cpp, or "
        "converted into MODELS_DIR for mlx (llama-family files)."
    )

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument(
            "--name", help="The id clients send as `model` (default: from the path)."
        )
        parser.add_argument("--default", action="store_true", help="Make it the default model.")
        parser.add_argument(
            "--backend",
            default="auto",
            choices=["auto", "mlx", "vllm", "llamacpp"],
            help=(
                "The engine that serves it (default: auto: LLM_SERVICE_BACKEND's choice; a .gguf "
                "file goes to llamacpp where it is built and there is no GPU)."
            ),
        )

    def handle(self, *args, path, name, default, backend, **options):
        try:
            row = import_model(path, name=name, make_default=default, backend=backend)
        except ImportError_ as exc:
            raise CommandError(str(exc)) from exc
        flag = " (default)" if row.is_default else ""
        self.stdout.write(f"Imported {row.name}{flag} -> {row.path}")
