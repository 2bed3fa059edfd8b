"""NumPy for the parts of a decode step that mlx's CPU backend does slowly on x86.

Profiling SmolLM2-135M decode steps (`perf`, docs/architecture.md) showed three such parts; NumPy
(vectorised `exp`, and its own OpenBLAS build) does them several times faster:
- `exp` is scalar in mlx on x86 (about 15 ns per element against NumPy's 0.6 ns), and SwiGLU takes one
  per intermediate activation: 1536 x 30 layers per token, a third of a prefill. `NumpySwiGLU` computes
  `silu(gate) * up` in NumPy on zero-copy views of mlx's buffers (one synchronisation per layer).
- A single row (one sequence decoding) goes through mlx's general matrix product; NumPy's
  matrix-vector product reads the weights about twice as fast. For one row, `NumpySwiGLU` runs the whole
  MLP in NumPy and `NumpyVocabulary` the vocabulary projection (16 ms in mlx, 3 ms in NumPy).
  Several rows stay in mlx: NumPy's OpenBLAS then brings its own pool of threads, which spins against
  mlx's and made a batch-8 step 1.8x slower.
- `NumpyVocabulary` stores the embedding, or the output projection, once and transposed: mlx's product
  with that layout was 10% faster at 16 rows, and the lookup reads its columns, so memory stays the same.
Float32 llama/qwen models on the CPU only; logits agree with mlx's own to about 1e-4
(tests/test_mlx_backend.py).
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np

log = logging.getLogger(__name__)

# mlx-lm modules whose MLP is down_proj(silu(gate_proj(x)) * up_proj(x)).
SWIGLU_MODULES = frozenset({"llama", "qwen2", "qwen3"})


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g < -88: silu is then -0.0
        out = g / (1.0 + np.exp(-g))
    out *= u
    return out


class NumpySwiGLU(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:  # one row: matrix-vector products, all in NumPy
            mx.eval(x)
            row = np.asarray(x).reshape(1, -1)
            gate = row @ np.asarray(self.gate_proj.weight).T
            up = row @ np.asarray(self.up_proj.weight).T
            out = _silu_mul(gate, up) @ np.asarray(self.down_proj.weight).T
            return mx.array(out).reshape(x.shape)
        gate, up = self.gate_proj(x), self.up_proj(x)
        mx.eval(gate, up)
        return self.down_proj(mx.array(_silu_mul(np.asarray(gate), np.asarray(up))))


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
    weight = getattr(mlp.gate_proj, "weight", None)
    # Quantized layers have no float32 weight; float16/bfloat16 have no NumPy twin worth using.
    return weight is not None and weight.dtype == mx.float32 and "scales" not in mlp.gate_proj


def install(model) -> bool:
    """Swap in the NumPy parts where they apply; returns whether it did."""
    if not applies(model):
        return False
    for layer in model.model.layers:
        layer.mlp = NumpySwiGLU(layer.mlp)
    body = model.model
    if getattr(model.args, "tie_word_embeddings", False):
        if isinstance(body.embed_tokens, nn.Embedding) and "scales" not in body.embed_tokens:
            body.embed_tokens = NumpyVocabulary(body.embed_tokens.weight)
    elif isinstance(getattr(model, "lm_head", None), nn.Linear) and "bias" not in model.lm_head:
        model.lm_head = NumpyHead(model.lm_head.weight)
    mx.eval(model.parameters())
    log.info("CPU: MLP and vocabulary projection through NumPy (%d layers)", len(body.layers))
    return True
