"""Embedding models on mlx through mlx-embeddings (BERT, XLM-RoBERTa, ModernBERT, Qwen3, ...).
No Django here.

One thread per model loads it and runs every forward pass (mlx streams are per thread): requests
queue their inputs, and the thread takes everything waiting (up to the batch size) into one padded
batch, so concurrent requests share a forward pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from inference.backends.base import EmbeddingModel
from inference.types import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class _Job:
    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class MLXEmbeddingModel(EmbeddingModel):
    backend_name = "mlx"

    def __init__(self, spec: ModelSpec) -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        self.eos_token_ids = frozenset()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting = 0
        self._running = 0
        loaded: Future = Future()
        self._thread = threading.Thread(
            target=self._run, args=(loaded,), name=f"embed-{spec.name}", daemon=True
        )
        self._thread.start()
        loaded.result()  # the model's load error, if any, is this call's

    @property
    def queued(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop, loop.create_future())
        self._waiting += len(inputs)
        self._jobs.put(job)
        return await job.future

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # --- the model's thread ----------------------------------------------------------------

    def _load(self) -> None:
        from mlx_embeddings.utils import load

        path = Path(self.spec.path)
        self.model, _ = load(str(path))
        config = json.loads((path / "config.json").read_text())
        self.dimensions = int(config.get("hidden_size") or config.get("d_model"))
        limit = int(config.get("max_position_embeddings", 512))
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():  # sentence-transformers' own limit, when it sets one
            limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
        self.context_length = limit
        self.memory_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        pad = self.tokenizer.pad_token_id
        self._pad = int(pad) if pad is not None else 0

    def _run(self, loaded: Future) -> None:
        with mx.stream(mx.default_stream(mx.default_device())):
            try:
                self._load()
            except BaseException as exc:
                loaded.set_exception(exc)
                return
            loaded.set_result(None)
            self._serve()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            size = len(job.inputs)
            while size < self.spec.max_batch_size:  # everything waiting joins this batch
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
                size += len(more.inputs)
            self._batch(jobs)

    def _batch(self, jobs: list[_Job]) -> None:
        inputs = [tokens for job in jobs for tokens in job.inputs]
        self._waiting -= len(inputs)
        self._running = len(inputs)
        try:
            vectors = self._forward(inputs)
        except Exception as exc:
            log.exception("embedding batch failed on %s", self.spec.name)
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        finally:
            self._running = 0
        at = 0
        for job in jobs:
            part, at = vectors[at : at + len(job.inputs)], at + len(job.inputs)
            job.loop.call_soon_threadsafe(_settle, job.future, part, None)

    def _forward(self, inputs: list[list[int]]) -> list[list[float]]:
        from mlx_embeddings.models.base import mean_pooling, normalize_embeddings

        width = max(len(t) for t in inputs)
        ids = mx.array([t + [self._pad] * (width - len(t)) for t in inputs])
        mask = mx.array([[1] * len(t) + [0] * (width - len(t)) for t in inputs])
        hidden = self.model(ids, attention_mask=mask).last_hidden_state
        pooling = self.spec.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "last":
            last = mx.array([len(t) - 1 for t in inputs])
            pooled = hidden[mx.arange(len(inputs)), last]
        elif pooling == "max":
            masked = mx.where(mask[..., None].astype(mx.bool_), hidden, -mx.inf)
            pooled = masked.max(axis=1)
        else:
            pooled = mean_pooling(hidden, mask)
        if self.spec.normalize:
            pooled = normalize_embeddings(pooled)
        return pooled.astype(mx.float32).tolist()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
