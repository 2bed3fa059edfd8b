"""The first code a vLLM engine core process runs: multiprocessing's spawn imports this module as
the child's `__main__` (`vllm._engine_environment` names it). vLLM's engine core does not watch
its parent, so a server killed outright (SIGKILL, the out-of-memory killer) left its engines
running, each holding its model's memory and a share of the cores. Here the kernel is asked to
kill the engine core when the thread that started it (the residency's worker, which lives as long
as the server) ends, as llama.cpp's runners are; and the engine core's workers with it. No Django
and no vLLM: this runs before either is imported."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "LLM_SERVICE_ENGINE_PARENT"

if __name__ == "__mp_main__" and sys.platform == "linux":
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.environ.get(PARENT_ENV) not in (None, str(os.getppid())):
        os._exit(1)  # the parent died before the line above: nobody is left to stop this one
    # The engine core's own workers import this module too, and end with the engine core.
    os.environ[PARENT_ENV] = str(os.getpid())
