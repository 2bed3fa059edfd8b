"""Our sgemm (inference/backends/skinny_sgemm.c): built, exact, preloaded by the server.

The kernels are checked against NumPy through ctypes for the shapes decoding and prefill produce (and
their odd sizes); then in a process started the way `serve` starts (preloaded ahead of OpenBLAS) through mlx
itself, products and whole-model logits; then in the running server.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from inference.backends import cpu_blas
from llmservice.cli import blas_preloads, find_openblas, new_preload
from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(
    not cpu_blas.supported(),
    reason="x86-64 Linux with AVX2/FMA only (mlx uses Accelerate on a Mac)",
)

ROW_MAJOR, COL_MAJOR, NO_TRANS, TRANS = 101, 102, 111, 112
P = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> ctypes.CDLL:
    path = cpu_blas.build(tmp_path_factory.mktemp("data"))
    assert path is not None and path.name == cpu_blas.library_name()
    lib = ctypes.CDLL(str(path))
    lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        P,
        ctypes.c_int,
        P,
        ctypes.c_int,
        ctypes.c_float,
        P,
        ctypes.c_int,
    ]
    lib.cblas_sgemm.restype = None
    return lib


def sgemm(lib, a, b, *, trans_b: bool, alpha=1.0, beta=0.0, c=None, order=ROW_MAJOR, trans_a=False):
    """C = alpha * op(a) @ op(b) + beta * C through the library, on NumPy arrays (may be views)."""
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    c = np.zeros((m, n), np.float32) if c is None else c.copy()
    lib.cblas_sgemm(
        order, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k, alpha,
        a.ctypes.data, a.strides[0] // 4, b.ctypes.data, b.strides[0] // 4, beta,
        c.ctypes.data, c.strides[0] // 4,
    )  # fmt: skip
    return c


def close(got, want) -> bool:
    return np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def check_products(lib, rows, shapes, *, kn_layout):
    """x @ w.T for each (n, k) through the library against NumPy; also with w stored as (k, n)."""
    rng = np.random.default_rng(rows)
    for n, k in shapes:
        x = rng.standard_normal((rows, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        assert close(sgemm(lib, x, w, trans_b=True), x @ w.T), (rows, n, k)
        if kn_layout:  # attention's p @ v
            assert close(sgemm(lib, x, np.ascontiguousarray(w.T), trans_b=False), x @ w.T)
    return rng


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11, 16])
def test_a_few_rows_times_a_weight_matrix_equal_numpys_product(lib, rows):
    # Decoding's shapes (SmolLM2: q/o, k/v, gate/up, down, vocabulary) and odd sizes for the tails;
    # the large ones go through the thread pool, the small ones stay on the calling thread.
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (7, 13), (100, 9)]
    check_products(lib, rows, shapes, kn_layout=True)


@pytest.mark.parametrize("rows", [17, 23, 64, 121, 256])
def test_a_prefills_rows_times_a_weight_matrix_equal_numpys_product(lib, rows):
    # Prefill's products (packed panels of 16 columns, 6-row tiles): SmolLM2's shapes, and sizes that
    # leave partial panels, partial tiles and a k tail.
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (7, 13), (100, 9), (33, 40)]
    rng = check_products(lib, rows, shapes, kn_layout=False)
    wide = rng.standard_normal((rows, 600), dtype=np.float32)
    x, w = wide[:, :576], rng.standard_normal((200, 576), dtype=np.float32)
    c = rng.standard_normal((rows, 200), dtype=np.float32)
    assert close(
        sgemm(lib, x, w, trans_b=True, alpha=0.5, beta=2.0, c=c), 0.5 * (x @ w.T) + 2.0 * c
    )


def test_alpha_beta_and_row_strides_are_honoured(lib):
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((8, 600), dtype=np.float32)
    x = wide[:, :576]  # rows 600 floats apart
    w = rng.standard_normal((1536, 576), dtype=np.float32)
    c = rng.standard_normal((8, 1536), dtype=np.float32)
    got = sgemm(lib, x, w, trans_b=True, alpha=0.5, beta=2.0, c=c)
    assert close(got, 0.5 * (x @ w.T) + 2.0 * c)
    got = sgemm(lib, x, np.ascontiguousarray(w.T), trans_b=False, alpha=-1.0, beta=1.0, c=c)
    assert close(got, c - x @ w.T)


def test_products_from_two_threads_at_once_and_in_quick_succession_stay_exact(lib):
    # The pool serves one caller at a time (the other computes alone), and helpers that wake late
    # for a product already finished must not touch the next one.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    cases = []
    for i in range(40):
        rows = 1 + i % 16 if i % 5 else 20 + 5 * i  # every fifth: a prefill's packed panels
        n = (576, 1536, 192, 49152 // 8)[i % 4]
        x = rng.standard_normal((rows, 576), dtype=np.float32)
        w = rng.standard_normal((n, 576), dtype=np.float32)
        cases.append((x, w, x @ w.T))

    def run_all(order):
        return all(close(sgemm(lib, x, w, trans_b=True), want) for x, w, want in order)

    with ThreadPoolExecutor(2) as pool:  # ctypes releases the GIL: the calls really overlap
        results = list(pool.map(run_all, [cases * 5, cases[::-1] * 5]))
    assert results == [True, True]


def test_calls_it_does_not_handle_are_still_computed_correctly(lib):
    # More rows than a prefill group, a transposed A, many rows of the (k, n) layout, column-major:
    # handed to the BLAS behind it, or (loaded alone, as here) to its reference loop.
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 33), dtype=np.float32)
    b = rng.standard_normal((21, 33), dtype=np.float32)
    assert close(sgemm(lib, a, b, trans_b=True), a @ b.T)
    assert close(sgemm(lib, a, np.ascontiguousarray(b.T), trans_b=False), a @ b.T)
    a_t = np.ascontiguousarray(a.T)
    assert close(sgemm(lib, a_t, b, trans_b=True, trans_a=True), a @ b.T)
    assert lib.llm_sgemm_handles(ROW_MAJOR, NO_TRANS, TRANS, 256) == 1
    assert lib.llm_sgemm_handles(ROW_MAJOR, NO_TRANS, TRANS, 257) == 0
    assert lib.llm_sgemm_handles(ROW_MAJOR, NO_TRANS, NO_TRANS, 16) == 1
    assert lib.llm_sgemm_handles(ROW_MAJOR, NO_TRANS, NO_TRANS, 17) == 0
    assert lib.llm_sgemm_handles(COL_MAJOR, NO_TRANS, TRANS, 1) == 0


PRELOADED_CHECK = textwrap.dedent(
    """
    import sys
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    from inference.backends import cpu_blas, mlx_cpu

    assert cpu_blas.active()
    rng = np.random.default_rng(0)
    # Products mlx asks for: decoding's few rows, attention's one-row products, a prefill group's
    # rows (packed panels), more rows (OpenBLAS's), a batched product.
    for m, n, k in [(1, 576, 576), (8, 1536, 576), (16, 49152, 576), (120, 1536, 576),
                    (300, 576, 576), (3, 5, 7)]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        got = np.array(mx.array(a) @ mx.array(w).T)
        assert np.allclose(got, a @ w.T, rtol=1e-4, atol=1e-3), (m, n, k)
    q = rng.standard_normal((4, 9, 1, 64), dtype=np.float32)
    kv = rng.standard_normal((4, 9, 37, 64), dtype=np.float32)
    scores = np.array(mx.array(q) @ mx.swapaxes(mx.array(kv), -1, -2))
    assert np.allclose(scores, q @ kv.swapaxes(-1, -2), rtol=1e-4, atol=1e-4)
    assert np.allclose(np.array(mx.array(scores) @ mx.array(kv)), scores @ kv, rtol=1e-4, atol=1e-3)

    # A whole model: the CPU parts over our sgemm give mlx-lm's logits (mlx-lm's model, same process).
    path = sys.argv[1]
    plain, _ = load(path)
    ours, _ = load(path)
    assert mlx_cpu.install(ours, positions=2048)
    assert type(ours.model.embed_tokens).__name__ == "Embedding"  # not transposed with our sgemm
    tokens = mx.array(rng.integers(0, 1000, (3, 12)))
    mine, theirs = make_prompt_cache(ours), make_prompt_cache(plain)
    for step in (tokens, tokens[:, :1], tokens[:1, :1]):
        if step.shape[0] == 1:
            mine, theirs = make_prompt_cache(ours), make_prompt_cache(plain)
        got, want = ours(step, cache=mine), plain(step, cache=theirs)
        assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), step.shape
    print("ok")
    """
)


def test_mlx_runs_on_it_when_preloaded_as_serve_does_and_models_give_the_same_logits(
    tmp_path, tiny_dir
):
    preloads = blas_preloads()
    assert find_openblas() and len(preloads) == 2 and "libllm_sgemm" in preloads[0]
    env = dict(os.environ, LD_PRELOAD=":".join(preloads))
    done = subprocess.run(
        [sys.executable, "-c", PRELOADED_CHECK, str(tiny_dir)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_server_runs_with_it_ahead_of_openblas(server):
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libllm_sgemm" in maps and "openblas" in maps
    assert "BLAS: openblas + llm-service sgemm," in server.log()


def test_serve_puts_it_ahead_of_openblas_whatever_the_preload_it_finds():
    ours, openblas = "/v/libllm_sgemm-1.so", "/usr/lib/libopenblas.so.0"
    wanted = [ours, openblas]
    assert new_preload("", wanted) == f"{ours}:{openblas}"
    assert new_preload(openblas, wanted) == f"{ours}:{openblas}"  # a benchmark's OpenBLAS
    assert new_preload(f"{openblas}:{ours}", wanted) == f"{ours}:{openblas}"  # wrong order
    assert new_preload(f"/x.so:{ours}:{openblas}", wanted) == f"{ours}:{openblas}:/x.so"
    assert new_preload(f"{ours}:{openblas}", wanted) is None  # already right: no re-exec


def test_behind_openblas_it_is_not_reported_active(tiny_dir):
    preloads = blas_preloads()
    env = dict(os.environ, LD_PRELOAD=":".join(reversed(preloads)))  # OpenBLAS's sgemm wins
    code = "from inference.backends import cpu_blas; print(cpu_blas.active())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "False", done.stderr
    env["LD_PRELOAD"] = ":".join(preloads)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "True", done.stderr


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLM_SERVICE_SGEMM", "false")
    assert blas_preloads() == [find_openblas()]
