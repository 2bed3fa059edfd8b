"""Faster pieces for llama-family models on mlx's CPU backend, where its x86 path is slow.

Profiling SmolLM2-135M decode steps (`perf`, docs/architecture.md) showed these parts, which NumPy
(vectorised `exp`, its own OpenBLAS build) or a table does several times faster:
- `exp` is scalar in mlx on x86 (about 15 ns per element against NumPy's 0.6 ns), and SwiGLU takes one
  per intermediate activation: 1536 x 30 layers per token, a third of a prefill. `NumpySwiGLU` computes
  `silu(gate) * up` in NumPy on zero-copy views of mlx's buffers (one synchronisation per layer).
- A single row (one sequence decoding) goes through mlx's general matrix product; NumPy's
  matrix-vector product reads the weights about twice as fast. For one row, `NumpySwiGLU` runs the whole
  MLP in NumPy and `NumpyVocabulary` the vocabulary projection (16 ms in mlx, 3 ms in NumPy).
  Several rows stay in mlx: NumPy's OpenBLAS then brings its own pool of threads, which spins against
  mlx's and made a batch-8 step 1.8x slower.
- RoPE: mlx computes sin and cos for every element of every head; `TableRoPE` reads them from a table
  made once per model (3-10% of a decode step).
- Attention over several query positions (a prefill): mlx's softmax pays the scalar `exp` for every
  score. `cpu_attention` computes it in NumPy (a group of 4 prompts: 66 ms -> 27 ms of about 380);
  a decode step's attention stays in mlx, where the synchronisation would cost more than it saves.
- `NumpyVocabulary` stores the embedding, or the output projection, once and transposed: mlx's product
  with that layout was 10% faster at 16 rows, and the lookup reads its columns, so memory stays the same.
With our own sgemm preloaded (`cpu_blas`, x86-64), mlx's products of a few rows run at memory
speed, one row included, and without a synchronisation: then the one-row NumPy paths and the
transposed vocabulary are not used, and the SwiGLU's `exp` (several rows), RoPE and prefill attention
remain here. NumPy's own OpenBLAS is held to one thread: its pool of two, beside the OpenBLAS mlx runs
on, made a lone sequence's step take 170-290 ms instead of about 65 (docs/benchmarks.md).
Float32 llama/qwen models on the CPU only; logits agree with mlx's own to about 1e-4
(tests/test_mlx_backend.py).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention as _mlx_attention
from threadpoolctl import ThreadpoolController

from inference.backends import cpu_blas

log = logging.getLogger(__name__)

# mlx-lm modules whose MLP is down_proj(silu(gate_proj(x)) * up_proj(x)).
SWIGLU_MODULES = frozenset({"llama", "qwen2", "qwen3"})


class _Scratch(threading.local):
    """A reused float32 buffer per thread: a fresh 0.7 MB temporary per layer cost more in page
    faults than the arithmetic (a prefill group's SwiGLU took 1.25 ms a layer in fresh arrays, 0.36 ms
    in this one). `mx.array` copies out of it, so the next layer may overwrite it."""

    LIMIT = 1 << 22  # elements kept between calls (16 MB); bigger ones are allocated each time

    def __init__(self) -> None:
        self.buffer = np.empty(0, np.float32)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        if size > self.LIMIT:
            return np.empty(shape, np.float32)
        if size > self.buffer.size:
            self.buffer = np.empty(size, np.float32)
        return self.buffer[:size].reshape(shape)


_scratch = _Scratch()


def _silu_mul(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(g) * u, in place in `out` (a new array when None)."""
    out = np.empty_like(g) if out is None else out
    np.negative(g, out=out)
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g < -88: silu is then -0.0
        np.exp(out, out=out)
    out += 1.0
    np.divide(g, out, out=out)
    out *= u
    return out


class NumpySwiGLU(nn.Module):
    def __init__(self, mlp: nn.Module, one_row_numpy: bool = True) -> None:
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self._one_row_numpy = one_row_numpy

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:
            if not self._one_row_numpy:  # our sgemm: mlx without a synchronisation is faster
                return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
            # one row: matrix-vector products, all in NumPy
            mx.eval(x)
            row = np.asarray(x).reshape(1, -1)
            gate = row @ np.asarray(self.gate_proj.weight).T
            up = row @ np.asarray(self.up_proj.weight).T
            out = _silu_mul(gate, up) @ np.asarray(self.down_proj.weight).T
            return mx.array(out).reshape(x.shape)
        gate, up = self.gate_proj(x), self.up_proj(x)
        mx.eval(gate, up)
        out = _silu_mul(np.asarray(gate), np.asarray(up), _scratch.take(gate.shape))
        return self.down_proj(mx.array(out))


_MASKED = np.float32(np.finfo(np.float32).min)  # finite: a row with every key masked stays finite


def numpy_attention(queries, keys, values, scale: float, mask) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` for float32 on the CPU, in NumPy.

    A prefill group of 4 prompts spent 66 ms of 384 in mlx's attention, most of it in its scalar `exp`
    (about 15 ns per score), and 27 ms here. Grouped-query heads share their key/value head's
    product. `mask`: None, "causal" (aligned to the last keys, as mlx's), or a boolean or additive
    array broadcastable to (batch, heads, queries, keys).
    """
    B, H, L, D = queries.shape
    KVH, S = keys.shape[1], keys.shape[2]
    rep = H // KVH
    mx.eval(queries, keys, values)
    q = np.asarray(queries).reshape(B, KVH, rep * L, D)
    scores = np.matmul(q, np.asarray(keys).swapaxes(-1, -2))  # (B, KVH, rep * L, S)
    scores *= scale
    grouped = scores.reshape(B, KVH, rep, L, S)  # a view
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        keep = np.arange(S)[None, :] <= np.arange(S - L, S)[:, None]
        np.copyto(grouped, _MASKED, where=~keep)
    elif mask is not None:
        m = np.asarray(mask)
        if m.ndim > 2:
            m = np.broadcast_to(m, (B, H, L, S)).reshape(B, KVH, rep, L, S)
        if m.dtype == np.bool_:
            np.copyto(grouped, _MASKED, where=~m)
        else:
            grouped += m
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, np.asarray(values))  # (B, KVH, rep * L, D)
    return mx.array(out.reshape(B, H, L, D))


def cpu_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`, with several query positions (a prefill) in NumPy.

    One query position (a decode step) stays in mlx: NumPy would need a synchronisation per layer,
    which costs a decode step more than the faster `exp` saves.
    """
    if (
        queries.shape[2] == 1
        or sinks is not None
        or hasattr(cache, "bits")
        or queries.dtype != mx.float32
        or keys.dtype != mx.float32
    ):
        return _mlx_attention(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
        )
    return numpy_attention(queries, keys, values, scale, mask)


class NumpyVocabulary(nn.Module):
    """The embedding and/or the output projection, stored once as a (dims, vocabulary) matrix."""

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight_t = mx.contiguous(weight.T)

    def __call__(self, ids: mx.array) -> mx.array:  # the embedding lookup
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size != x.shape[-1]:
            return x @ self.weight_t  # mlx, lazily: a prefill chunk's logits are often never read
        mx.eval(x)
        return mx.array(np.asarray(x).reshape(1, -1) @ np.asarray(self.weight_t)).reshape(
            *x.shape[:-1], -1
        )


class TableRoPE(nn.Module):
    """`nn.RoPE` (the non-traditional layout) with cos/sin read from a table, not computed per element.

    mlx's rope evaluates sin and cos for every element of every head (scalar on x86); the angles only
    depend on the position and the frequency, so one table (`rope_table`) serves every head and layer.
    Positions must stay below the table's length: the backend sizes it to the model's context, which
    also bounds every request (inference/serving/base.py).
    """

    def __init__(self, rope: nn.RoPE, table: tuple[mx.array, mx.array]) -> None:
        super().__init__()
        self.rope = rope
        self._cos, self._sin = table  # "_": shared, and not parameters
        self.positions = table[0].shape[0]

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        length, dims = x.shape[-2], x.shape[-1]
        if dims != self.rope.dims:
            return self.rope(x, offset=offset)
        if isinstance(offset, mx.array):
            cos, sin = self._gathered(offset, length)
        elif offset + length <= self.positions:
            cos, sin = self._cos[offset : offset + length], self._sin[offset : offset + length]
        else:
            return self.rope(x, offset=offset)
        half = dims // 2
        x1, x2 = x[..., :half], x[..., half:]
        return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def _gathered(self, offset: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """cos and sin at per-sequence positions (a batch cache's offsets; left padding makes some
        negative, masked anyway), shaped (B, 1, L, dims/2). Within `shared_positions` every layer
        reuses the first layer's: one gather per forward pass instead of two per layer."""
        shared = _pass.positions
        if shared is not None and shared[1] == length:
            key = id(self._cos)
            if key not in _pass.gathered:
                _pass.gathered[key] = self._gather(shared[0], length)
            return _pass.gathered[key]
        return self._gather(offset, length)

    def _gather(self, offset: mx.array, length: int) -> tuple[mx.array, mx.array]:
        at = mx.clip(offset.reshape(-1, 1) + mx.arange(length), 0, self.positions - 1)
        return self._cos[at][:, None], self._sin[at][:, None]


class _Pass(threading.local):
    positions: tuple[mx.array, int] | None = None
    gathered: dict[int, tuple[mx.array, mx.array]]


_pass = _Pass()


@contextmanager
def shared_positions(offset: mx.array, length: int) -> Iterator[None]:
    """Around one forward pass of `length` tokens over batch caches whose layers all hold the same
    per-sequence offsets (`offset`, any layer's): RoPE gathers its cos and sin once, not per layer
    (about 5% of a prefill group's time)."""
    _pass.positions, _pass.gathered = (offset, length), {}
    try:
        yield
    finally:
        _pass.positions, _pass.gathered = None, {}


def rope_table(rope: nn.RoPE, positions: int) -> tuple[mx.array, mx.array]:
    freqs = rope.base ** (-np.arange(0, rope.dims, 2, dtype=np.float64) / rope.dims)
    angles = (np.arange(positions, dtype=np.float64) * rope.scale)[:, None] * freqs[None]
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


class NumpyHead(NumpyVocabulary):
    """An untied output projection."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.as_linear(x)


def applies(model) -> bool:
    if mx.default_device().type != mx.cpu:
        return False
    if type(model).__module__.rsplit(".", 1)[-1] not in SWIGLU_MODULES:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    mlp = getattr(layers[0], "mlp", None)
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    # Plain float32 weights only: quantized layers have scales, float16/bfloat16 no NumPy twin worth
    # using, and the one-row NumPy path has no bias term.
    return all(
        isinstance(p, nn.Linear) and p.weight.dtype == mx.float32 and "bias" not in p
        for p in projections
    )


def install(model, positions: int, *, sgemm: bool | None = None) -> bool:
    """Swap in the faster parts where they apply; returns whether it did.

    `positions`: the longest sequence the model will see (its context length), for the RoPE table.
    `sgemm`: whether our sgemm serves mlx's products (default: whether it is preloaded).
    """
    if not applies(model):
        return False
    if sgemm is None:
        sgemm = cpu_blas.active()
    # NumPy's products (attention's, and one row's without our sgemm) run on one thread: its own pool
    # of OpenBLAS threads beside the one mlx uses made a lone sequence's step 3-4x slower.
    for blas in ThreadpoolController().select(user_api="blas").lib_controllers:
        if blas.filepath and Path(blas.filepath).parent.name == "numpy.libs":
            blas.set_num_threads(1)
    # The attention function is a global of the model's module (mlx_lm.models.llama, ...): every
    # model of this architecture in the process gets it, which is what we want on the CPU.
    module = sys.modules[type(model).__module__]
    if getattr(module, "scaled_dot_product_attention", None) is _mlx_attention:
        module.scaled_dot_product_attention = cpu_attention
    tables: dict[tuple, tuple[mx.array, mx.array]] = {}
    for layer in model.model.layers:
        layer.mlp = NumpySwiGLU(layer.mlp, one_row_numpy=not sgemm)
        rope = getattr(layer.self_attn, "rope", None)
        if type(rope) is nn.RoPE and not rope.traditional:
            key = (rope.dims, rope.base, rope.scale)
            if key not in tables:
                tables[key] = rope_table(rope, positions)
            layer.self_attn.rope = TableRoPE(rope, tables[key])
    body = model.model
    # With our sgemm, mlx's own layout stays: x @ W.T is the product it reads straight from memory.
    if not sgemm and getattr(model.args, "tie_word_embeddings", False):
        if isinstance(body.embed_tokens, nn.Embedding) and "scales" not in body.embed_tokens:
            body.embed_tokens = NumpyVocabulary(body.embed_tokens.weight)
    elif not sgemm and isinstance(getattr(model, "lm_head", None), nn.Linear):
        if "bias" not in model.lm_head:
            model.lm_head = NumpyHead(model.lm_head.weight)
    mx.eval(model.parameters())
    log.info(
        "CPU: %s, RoPE from a table (%d layers)",
        "products through our sgemm, SwiGLU in NumPy"
        if sgemm
        else "MLP and vocabulary projection through NumPy",
        len(body.layers),
    )
    return True
