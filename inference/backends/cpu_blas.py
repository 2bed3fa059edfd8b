"""Our own `cblas_sgemm` on x86-64 CPUs: built once with the C compiler, preloaded.

mlx's CPU backend does every matrix product through `cblas_sgemm`. OpenBLAS (preloaded by
`llm-service serve`) is slow for decoding's products: a few rows times each weight matrix, where it
repacks the whole matrix on every call, and thousands of one-row attention products per step, where
its per-call overhead dominates. `skinny_sgemm.c` computes those itself at memory bandwidth, and a
prefill's products of up to 256 rows with packed panels; it hands every other call on to OpenBLAS
(docs/benchmarks.md).

LD_PRELOAD only works from a process's start, so `llmservice/cli.py` builds the library (once per
source version, with `cc`) and re-executes the server with it ahead of OpenBLAS. No Django here:
the CLI calls this before settings exist.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_sgemm.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread")


def supported() -> bool:
    """Linux on an x86-64 CPU with AVX2 and FMA (every x86 server CPU since 2013-2015)."""
    if not sys.platform.startswith("linux") or platform.machine() not in {"x86_64", "AMD64"}:
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return "avx2" in flags and "fma" in flags


def library_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    return f"libllm_sgemm-{digest}.so"


def build_dirs(data_dir: Path | None = None) -> list[Path]:
    """Where the library goes: beside the virtualenv (shared by every data dir), else the data dir."""
    dirs = [Path(sys.prefix) / "lib" / "llm-service"]
    if data_dir is not None:
        dirs.append(Path(data_dir) / "lib")
    return dirs


def build(data_dir: Path | None = None) -> Path | None:
    """The built library, compiling it on first use; None where it cannot be built or used."""
    if not supported():
        return None
    name = library_name()
    for folder in build_dirs(data_dir):
        if (folder / name).is_file():
            return folder / name
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc): decoding uses OpenBLAS's matrix products only")
        return None
    error = ""
    for folder in build_dirs(data_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{name}.{os.getpid()}.tmp"
            subprocess.run(
                [compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-ldl"],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
            partial.rename(folder / name)  # atomic: a concurrent start never sees half a file
            return folder / name
        except (OSError, subprocess.SubprocessError) as exc:
            error = getattr(exc, "stderr", None) or str(exc)
    log.warning("could not build %s (%s): decoding uses OpenBLAS only", SOURCE.name, error.strip())
    return None


def active() -> bool:
    """Whether mlx's `cblas_sgemm` is ours: preloaded, and ahead of any other BLAS."""
    ours = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "libllm_sgemm" in p]
    try:
        process = ctypes.CDLL(None)
        if not ours or not hasattr(process, "llm_sgemm_threads"):
            return False
        resolved = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
        return resolved == ctypes.cast(ctypes.CDLL(ours[0]).cblas_sgemm, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False


if __name__ == "__main__":  # `python -m inference.backends.cpu_blas`: build it now (make setup)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build()
    print(path or "skinny sgemm: not built (unsupported platform or no compiler)")
