"""llama.cpp backend: each loaded GGUF model is a `llama-server` runner process, as Ollama runs it.

llama.cpp serves GGUF files as shipped (every quantization it reads, K-quants included) and batches
continuously itself: one slot per sequence (`-np` = the model's max_batch_size), a new request
takes a free slot at the next step, prefix reuse per slot (`cache_prompt`). We keep that scheduler
and talk to the runner over a Unix socket with llama.cpp's native `/completion` API, prompts as
token ids (the chat template is rendered by serving, as for the other backends), streamed, with
the token ids and log-probabilities of each step. Closing a request's HTTP stream is how it is
aborted: llama-server notices the closed connection and frees the slot.

Why a runner process rather than llama-cpp-python's in-process bindings: llama-server's own slots
are llama.cpp's batching, sampling and prefix cache in C++, with no Python in the decode loop;
llama-cpp-python's server serves one request at a time, and its low-level batch API would have us
re-implement slots and sampling in Python. Measured figures are in docs/benchmarks.md.

Serving detokenizes and applies stop strings (with the tokenizer transformers builds from the
GGUF's vocabulary, the same ids as llama.cpp's), so every backend cuts text the same way.
No Django here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from inference.backends.base import (
    Backend,
    BackendUnavailable,
    Capabilities,
    LoadedModel,
    exit_description,
)
from inference.backends.threads import Inflight
from inference.gbnf import json_to_gbnf, lark_to_gbnf, load_converter
from inference.text import Speller
from inference.types import Constraint, GenerationRequest, ModelSpec, TokenDelta

log = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parents[2]  # the project, for the conversion's child process

# JSON schemas and forced tool calls' grammars are translated to llama.cpp's GBNF
# (inference/gbnf.py) with its schema converter, kept beside the binary.
CAPABILITIES = Capabilities(prefix_cache=True)
# A request waits for the generation requests still being parsed (announced, see
# LlamaCppBackend.announce) so a burst reaches llama-server together and prefills in one batch:
# at most this long, as the step loop's bursts (step_loop.COALESCE_MAX).
BURST_MAX = 0.15
BURST_POLL = 0.002

# llama-server preallocates each slot's KV cache: without a per-model context length, a slot gets
# the model's own context up to this many tokens (SmolLM2's 8192 x 16 slots would be 3 GB).
DEFAULT_CONTEXT = 4096
# Host memory llama-server may use to keep idle slots' prompt caches (its default is 8 GiB).
CACHE_RAM_MIB = 512
READY_TIMEOUT = 600.0
_FINISH = {"eos": "stop", "word": "stop", "limit": "length"}


class LlamaServerError(RuntimeError):
    """llama-server could not load or serve a model; the message carries its own reason."""


def find_llama_server(configured: str | os.PathLike | None = None) -> Path | None:
    """The llama-server binary: the configured one (settings default to the one `make setup`
    builds), else the one on PATH."""
    if configured:
        return Path(configured)
    found = shutil.which("llama-server")
    return Path(found) if found else None


# --- the GGUF's facts (read once per file, kept beside its tokenizer) --------------------------


def _gguf_facts(path: Path, cache_dir: Path, spawn) -> tuple[Path, dict]:
    """The file's tokenizer folder and the metadata the runner's sizing needs, read once per file
    (converting the vocabulary takes seconds) by a child process that `spawn`
    starts: a stop meanwhile kills it rather than waiting, and the memory it takes (Gemma's
    vocabulary is 262k tokens) goes with it."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    folder = cache_dir / key[:16]
    facts_file = folder / "gguf.json"
    if not facts_file.is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache_dir))
        try:
            child = spawn(
                [sys.executable, "-m", "inference.backends.llamacpp", str(path), str(tmp)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), *sys.path])},
            )
            _, err = child.communicate()
            if child.returncode:
                lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
                raise LlamaServerError(lines[-1] if lines else f"reading {path.name} failed")
            try:
                os.rename(tmp, folder)
            except OSError:
                # Another server sharing the data directory wrote it first; theirs is whole.
                if not facts_file.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, json.loads(facts_file.read_text())


def read_gguf(path: Path, out: Path) -> None:
    """In _gguf_facts' child process: write the GGUF's facts and its tokenizer to `out`."""
    # transformers' own GGUF reader: gguf's GGUFReader makes a numpy view per string, which
    # took most of a minute for Gemma 3's vocabulary of 262k tokens.
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(path))
    except Exception as exc:
        raise LlamaServerError(f"{path.name} is not a readable GGUF file: {exc}") from exc
    field = metadata.get
    arch = field("general.architecture", "")
    heads = field(f"{arch}.attention.head_count", 1)
    heads = max(heads) if isinstance(heads, list) else heads
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
    embed = field(f"{arch}.embedding_length", 0)
    facts = {
        "architecture": arch,
        "context_length": field(f"{arch}.context_length", DEFAULT_CONTEXT),
        "layers": field(f"{arch}.block_count", 0),
        "kv_width": kv_heads * field(f"{arch}.attention.key_length", embed // max(heads, 1)),
        "eos": [
            t
            for t in (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id"))
            if t is not None
        ],
        # transformers' conversion leaves these off; Gemma's prompts must start with <bos>
        "add_bos": bool(field("tokenizer.ggml.add_bos_token", False)),
        "add_eos": bool(field("tokenizer.ggml.add_eos_token", False)),
    }
    try:
        # Not AutoTokenizer: to pick a class it builds the model's config, which for most
        # architectures reads the file again with GGUFReader. The vocabulary, merges and special
        # tokens, all serving uses, are the same in either class.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise LlamaServerError(
            f"cannot build a tokenizer from {path.name}'s vocabulary: {exc}"
        ) from exc
    tokenizer.save_pretrained(str(out))
    (out / "gguf.json").write_text(json.dumps(facts))


# --- the runner process ----------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the runner, before exec: killed when the server process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_process(argv: list[str], **kwargs) -> subprocess.Popen:
    # Its own session: a Ctrl-C in the terminal reaches us (to drain), not the child.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        **kwargs,
    )


class Runner:
    """One `llama-server` process serving one GGUF file on a Unix socket in its own folder."""

    def __init__(self, binary: Path, args: list[str], spawn=None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="llm-service-llamacpp-"))
        self.socket = str(self.folder / "llama.sock")
        self.argv = [str(binary), *args, "--host", self.socket]
        self.output: deque[str] = deque(maxlen=40)  # its last lines: the reason when it fails
        self.process = (spawn or child_process)(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Not mlx's BLAS preloads (llmservice/cli.py): llama.cpp has its own kernels.
            env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
        )
        threading.Thread(target=self._drain, name="llama-server-output", daemon=True).start()

    def _drain(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.output.append(line)
            log.debug("llama-server: %s", line)

    def reason(self) -> str:
        lines = [ln for ln in self.output if "error" in ln.lower() or "failed" in ln.lower()]
        return "; ".join(lines[-3:]) or "; ".join(list(self.output)[-3:]) or "no output"

    def exit_reason(self) -> str:
        how = exit_description(self.process.returncode)
        return f"llama-server exited ({how}): {self.reason()}"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    time.sleep(0.1)  # let the output thread read the last lines
                    raise LlamaServerError(self.exit_reason())
                with contextlib.suppress(httpx.HTTPError, OSError):
                    if client.get("http://llama/health").status_code == 200:
                        return
                time.sleep(0.1)
        self.stop()
        raise LlamaServerError(f"llama-server was not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the loaded model -------------------------------------------------------------------------


async def _events(req: _Request, socket: str, body: dict) -> AsyncIterator[dict]:
    """POST /completion to a runner and yield its server-sent events as dicts.

    A small HTTP/1.1 reader rather than httpx, and orjson rather than json: on a CPU the runner's
    threads need every core, and httpx's stream costs about 2.5x the CPU per token of this
    (docs/benchmarks.md)."""
    reader, writer = await asyncio.open_unix_connection(socket, limit=1 << 24)
    req.writer = writer
    try:
        if req.aborted:
            return
        payload = json.dumps(body).encode()
        writer.write(
            b"POST /completion HTTP/1.1\r\nHost: llama\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if status != 200:
            if chunked:
                text = b"".join([chunk async for chunk in _chunks(reader)])
            else:
                text = await reader.readexactly(int(headers.get("content-length", "0")))
            raise LlamaServerError(
                f"llama-server answered {status}: {text.decode('utf-8', 'replace')}"
            )
        buffer = b""
        async for data in _chunks(reader) if chunked else _until_closed(reader):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        yield orjson.loads(line[6:])
    finally:
        writer.transport.abort()  # closing the connection is what frees the slot


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body as it arrives, one read per arrival: llama-server sends a chunk per token,
    and reading each chunk's size line and data apart would be two waits per token."""
    pending = b""
    while data := await reader.read(1 << 16):
        pending += data
        body = []
        while (end := pending.find(b"\r\n")) >= 0:
            size = int(pending[:end].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                yield b"".join(body)
                return
            if len(pending) < end + size + 4:
                break  # the rest of this chunk is still on its way
            body.append(pending[end + 2 : end + 2 + size])
            pending = pending[end + size + 4 :]
        if body:
            yield b"".join(body)
    raise asyncio.IncompleteReadError(pending, None)  # closed before the last chunk


def _logprob(value: float | None) -> float:
    # llama-server's JSON library writes -inf (a token its sampler ruled out) as null.
    return -math.inf if value is None else value


async def _until_closed(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(1 << 16):
        yield data


@dataclasses.dataclass
class _Request:
    request_id: str
    started: bool = False  # the runner sent its first token (prefill done)
    aborted: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the consumer's, where its stream is read
    writer: asyncio.StreamWriter | None = None


class LlamaCppModel(LoadedModel):
    backend_name = "llamacpp"
    capabilities = CAPABILITIES

    def __init__(
        self,
        backend: LlamaCppBackend,
        spec: ModelSpec,
        runner: Runner,
        tokenizer: Any,
        *,
        context_length: int,
        memory_bytes: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self._backend = backend
        self.spec = spec
        self.runner = runner
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.memory_bytes = memory_bytes
        self.eos_token_ids = eos_token_ids
        # llama.cpp ends generation on more tokens than the GGUF names (FIM markers, the other
        # end-of-text tokens), all of them special: one is held until the next chunk says
        # whether generation ended on it.
        special = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        self._endings = eos_token_ids | frozenset(special)
        grammars = backend.schema_converter is not None
        self.capabilities = dataclasses.replace(
            CAPABILITIES, json_schema=grammars, tool_grammars=grammars
        )
        self._inflight = Inflight()
        self._speller: Speller | None = None  # built when first needed: see _recovered

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """llama-server's /completion request for one sequence. Every sampler is set, since
        llama.cpp's defaults (top_k 40, top_p 0.95, min_p 0.05, temperature 0.8) are not the
        APIs' (off, off, off, 1.0). A greedy request samples from the one most likely token
        (`top_k` 1), the same choice as temperature 0 over the whole vocabulary without
        llama.cpp's three passes over it per token (docs/benchmarks.md)."""
        p = request.params
        return {
            **(self._grammar(request.constraint) if request.constraint is not None else {}),
            "prompt": list(request.prompt_tokens),
            "n_predict": p.max_tokens,
            "temperature": p.temperature,
            "top_k": 1 if p.temperature == 0 else p.top_k,
            "top_p": p.top_p,
            "min_p": p.min_p,
            "typical_p": 1.0,
            "seed": p.seed if p.seed is not None else -1,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "repeat_penalty": p.repetition_penalty,
            "repeat_last_n": self.context_length,  # the whole context, as on vLLM and mlx
            "logit_bias": [[int(t), float(b)] for t, b in p.logit_bias],
            "n_probs": max(p.top_logprobs, 1) if p.logprobs else 0,
            "stream": True,
            "return_tokens": True,
            "cache_prompt": True,
            "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
        }

    def _grammar(self, constraint: Constraint) -> dict[str, Any]:
        """llama-server's fields for `constraint`; ValueError where it cannot follow it."""
        converter = self._backend.schema_converter
        if converter is None:
            raise ValueError("this llama-server has no JSON-schema-to-GBNF converter beside it")
        if constraint.kind == "json_schema":
            return {"grammar": json_to_gbnf(json.loads(constraint.source), converter)}
        fields: dict[str, Any] = {"grammar": lark_to_gbnf(constraint.source, converter)}
        if constraint.trigger is not None:
            text, token = constraint.trigger
            trigger = {"type": 0, "value": text, "token": token} if token is not None else None
            # A text that is one token of the vocabulary must be a preserved token to trigger.
            fields |= {
                "grammar_lazy": True,
                "grammar_triggers": [trigger or {"type": 1, "value": text}],
                "preserved_tokens": [text],
            }
        return fields

    def refusal(self, constraint: Constraint) -> str | None:
        try:
            self._grammar(constraint)
        except ValueError as exc:
            return str(exc)
        return None

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        body = self.body(request)
        rid = request.request_id
        req = _Request(rid)
        self._inflight.admit(
            rid, req, self.spec.name, self.spec.max_batch_size, self._backend.max_queue
        )
        deltas = self._deltas(request, body, req)
        # Dropped without being iterated: nothing was sent, but it holds an admission place.
        weakref.finalize(deltas, self._forget, req)
        return deltas

    def _forget(self, req: _Request) -> None:
        self._inflight.remove(req.request_id, req)

    async def _deltas(
        self, request: GenerationRequest, body: dict, req: _Request
    ) -> AsyncIterator[TokenDelta]:
        """On the consumer's loop: the runner's events -> TokenDeltas. Leaving early (cancelled,
        closed) or `abort` closes the connection, which makes llama-server free the slot."""
        req.loop = asyncio.get_running_loop()
        want, top_n = request.params.logprobs, request.params.top_logprobs
        held: list[TokenDelta] = []  # an end-of-generation token, until the end says so
        finished, seen = False, 0
        try:
            await self._backend.burst_gathered()
            async with contextlib.aclosing(_events(req, self.runner.socket, body)) as events:
                async for chunk in events:
                    if "error" in chunk:
                        raise LlamaServerError(str(chunk["error"].get("message", chunk["error"])))
                    converted = self._convert(chunk, want, top_n)
                    decoded = chunk.get("tokens_predicted")
                    if decoded is not None and decoded > seen + len(converted):
                        if self._speller is None:  # a second or so for a large vocabulary
                            self._speller = await asyncio.to_thread(Speller, self.tokenizer)
                        missing = decoded - seen
                        if not converted and chunk.get("stop_type") == "eos":
                            missing -= 1  # the end token, never sent after half a character
                        recover = functools.partial(
                            self._recovered,
                            self._speller,
                            chunk.get("content") or "",
                            converted,
                            missing,
                        )
                        # Spelling takes time with the square of a long run (a random model's):
                        # off the loop, where other streams are served.
                        converted = recover() if missing < 16 else await asyncio.to_thread(recover)
                    seen = decoded if decoded is not None else seen + len(converted)
                    deltas = held + converted
                    held = []
                    if not chunk.get("stop"):
                        if deltas and deltas[-1].token in self._endings:
                            held = [deltas.pop()]
                    else:
                        deltas = self._finish(chunk, deltas)
                    req.started = True
                    self._backend.count_tokens(sum(d.token is not None for d in deltas))
                    for delta in deltas:
                        finished = delta.finish_reason is not None
                        yield delta
                    if chunk.get("stop"):
                        break
            if not finished:
                finished = True
                yield TokenDelta(None, finish_reason="stop")
        except (OSError, asyncio.IncompleteReadError, LlamaServerError, ValueError) as exc:
            if finished:
                return
            finished = True
            if req.aborted:
                yield TokenDelta(None, finish_reason="stop")
                return
            if not isinstance(exc, LlamaServerError):
                # A runner that closed the stream midway has usually died: wait for its exit
                # (a moment; longer only on a loaded machine), so that the reason says so.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(self.runner.process.wait, 5.0)
            if isinstance(exc, LlamaServerError) or self.runner.process.poll() is None:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                reason = self.runner.exit_reason()
            log.warning("llama.cpp request %s failed: %s", req.request_id, reason)
            yield TokenDelta(None, finish_reason="error", error=reason)
        finally:
            self._forget(req)

    @staticmethod
    def _convert(chunk: dict, want: bool, top_n: int) -> list[TokenDelta]:
        probs = chunk.get("completion_probabilities") or []
        deltas = []
        for i, token in enumerate(chunk.get("tokens") or ()):
            lp, top = None, ()
            if want and i < len(probs):
                lp = _logprob(probs[i].get("logprob"))
                top = tuple(
                    (t["id"], _logprob(t["logprob"])) for t in probs[i].get("top_logprobs", ())
                )
            deltas.append(TokenDelta(token, lp, top[:top_n]))
        return deltas

    def _recovered(
        self, speller: Speller, content: str, converted: list[TokenDelta], count: int
    ) -> list[TokenDelta]:
        """llama-server streams a token that leaves half a UTF-8 character only with the token
        that completes it, and then only that one's id; `content` is their text, `count` how
        many tokens they were. Ids spelling that text in that many tokens stand in for the ids
        left out, so that both the text and usage come out as generated. Tokens of a character
        that never completed are not streamed at all: ids that spell no text stand in."""
        if not converted:
            return [TokenDelta(t) for t in speller.unfinished(count)]
        last = converted[-1]
        ids = self.tokenizer.encode(content, add_special_tokens=False)
        if len(ids) != count and last.token is not None:
            ids = speller.spell(content, count, last.token) or ids
        if not content or not ids:
            return converted
        if ids[-1] != last.token:
            last = TokenDelta(ids[-1], finish_reason=last.finish_reason)
        return [TokenDelta(t) for t in ids[:-1]] + [last]

    def _finish(self, chunk: dict, deltas: list[TokenDelta]) -> list[TokenDelta]:
        """The last chunk: its reason and cached prompt tokens on the last delta. The token that
        ended generation (llama.cpp streams it before the end) is not output, as on the others."""
        stop_type = chunk.get("stop_type", "")
        finish = _FINISH.get(stop_type, "stop")
        if stop_type == "eos" and deltas and deltas[-1].token in self._endings:
            deltas = deltas[:-1]
        cached = (chunk.get("timings") or {}).get("cache_n")
        if deltas:
            deltas[-1] = dataclasses.replace(deltas[-1], finish_reason=finish, cached_tokens=cached)
        else:
            deltas.append(TokenDelta(None, finish_reason=finish, cached_tokens=cached))
        return deltas

    def abort(self, request_id: str) -> None:
        req = self._inflight.get(request_id)
        if req is None:
            return
        req.aborted = True
        # Its deltas may never be iterated again (a consumer gone while not awaiting them), so
        # its finally would wait for the garbage collector: it leaves the counts now.
        self._forget(req)
        if req.loop is not None and req.writer is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is gone
                req.loop.call_soon_threadsafe(req.writer.transport.abort)

    # -- facts --

    @property
    def alive(self) -> bool:
        return self.runner.process.poll() is None

    @property
    def running(self) -> int:
        return self._inflight.count(started=True)

    @property
    def queued(self) -> int:
        return self._inflight.count(started=False)

    @property
    def engine_requests(self) -> int:
        """What llama-server itself still works on: slots processing plus deferred tasks."""
        import httpx

        try:
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=self.runner.socket), timeout=5.0
            ) as client:
                text = client.get("http://llama/metrics").text
        except (httpx.HTTPError, OSError):
            return self.running + self.queued
        total = 0.0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("llamacpp:requests_processing", "llamacpp:requests_deferred"):
                total += float(value)
        return int(total)

    def close(self) -> None:
        pending = self._inflight.close()
        if pending is None:
            return
        for req in pending:
            self.abort(req.request_id)
        self.runner.stop()
        self._backend.forget(self)


def physical_cores(cpus: set[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """The cores among the CPUs this process may run on, counting a core's SMT siblings once:
    llama.cpp's own default for its threads, and what Ollama's docs recommend. A sibling shares
    its core's arithmetic units, so a thread on it adds little to llama.cpp's matrix products,
    and the siblings left free are where our server streams from. Unlike llama.cpp's count, only
    the CPUs we may run on (a container's cpuset); their number where the topology cannot be
    read."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(sysfs, f"cpu{cpu}", "topology", "thread_siblings_list").read_text()
        except OSError:
            return len(cpus)
        cores.add(siblings.strip())
    return len(cores) or len(cpus)


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(
        self,
        *,
        max_queue: int = 64,
        server: str | os.PathLike | None = None,
        threads: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        binary = find_llama_server(server)
        if binary is None or not binary.is_file():
            raise BackendUnavailable(
                "llama.cpp's llama-server was not found: `make setup` builds it, or set "
                "LLM_SERVICE_LLAMA_SERVER to its path"
            )
        self.binary = binary
        # llama.cpp's JSON-schema-to-GBNF module, which .ci/llama-server keeps beside the binary
        # it builds: forced tool calls need it (a llama-server from elsewhere has none).
        self.schema_converter = load_converter(binary.parent.parent / "python" / "llama_grammar.py")
        self.max_queue = max_queue
        self.threads = threads or physical_cores()
        base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "llm-service"
        self.cache_dir = base / "llamacpp"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._models: list[LlamaCppModel] = []
        self._tokens = 0
        # A load's child processes (the tokenizer conversion, the runner until it is ready): a
        # stop kills them rather than waiting out a load.
        self._loading: set[subprocess.Popen] = set()
        self._stopping = False
        self._announced = 0

    @property
    def device(self) -> str:
        return f"cpu ({self.threads} threads)"

    def announce(self, count: int) -> None:
        with self._lock:
            self._announced = max(0, self._announced + count)

    async def burst_gathered(self) -> None:
        """Returns once no other generation request is being parsed (or after BURST_MAX). The
        HTTP layer parses a burst one request at a time, a few ms each; sent as each is ready,
        its prompts would prefill in several llama-server steps instead of one."""
        deadline = time.monotonic() + BURST_MAX
        while self._announced and time.monotonic() < deadline:
            await asyncio.sleep(BURST_POLL)

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    def count_tokens(self, count: int) -> None:
        self._tokens += count

    def forget(self, model: LlamaCppModel) -> None:
        with self._lock:
            if model in self._models:
                self._models.remove(model)

    def args(self, spec: ModelSpec, context: int) -> list[str]:
        slots = spec.max_batch_size
        batch = max(spec.prefill_batch_size or 512, 32)
        return [
            "--model", spec.path,
            "--alias", spec.name,
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads),
            "--parallel", str(slots),
            "--ctx-size", str(context * slots),  # each slot gets context tokens
            "--batch-size", str(max(batch, 2048)),
            "--ubatch-size", str(batch),
            "--cache-ram", str(CACHE_RAM_MIB),
            "--no-webui",
            "--metrics",
            "--log-verbosity", "2",
            # How long its threads spin for the next step before they sleep. llama.cpp keeps a
            # thread pool for steps of one token (a single stream), set by --poll, and one for
            # batches and prefills, set by --poll-batch. A single stream's threads spin only
            # briefly, since the server process needs a core for each token it streams; batches
            # keep llama.cpp's default (the llamacpp section, docs/benchmarks.md).
            "--poll", "10",
            "--poll-batch", "50",
        ]  # fmt: skip

    def load(self, spec: ModelSpec) -> LlamaCppModel:
        if spec.kind != "chat":
            raise BackendUnavailable("the llamacpp backend serves chat models, not embeddings")
        path = Path(spec.path)
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise LlamaServerError(f"{spec.path} is not a .gguf file: llamacpp serves GGUF files")
        try:
            folder, facts = _gguf_facts(path, self.cache_dir, self._spawn)
            if self._stopping:
                raise LlamaServerError("stopped")
            # What read_gguf saved; AutoTokenizer's module would import torch for nothing.
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
            tokenizer.add_bos_token = facts.get("add_bos", False)
            tokenizer.add_eos_token = facts.get("add_eos", False)
            context = spec.context_length or min(int(facts["context_length"]), DEFAULT_CONTEXT)
            runner = Runner(self.binary, self.args(spec, context), self._spawn)
            try:
                runner.wait_ready()
            except BaseException:
                runner.stop()
                raise
        except LlamaServerError:
            if self._stopping:
                raise BackendUnavailable("the server is stopping") from None
            raise
        finally:
            with self._lock:
                self._loading.clear()  # one load at a time (the residency thread)
        eos = set(facts["eos"])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        kv = 2 * 2 * facts["layers"] * facts["kv_width"] * context * spec.max_batch_size  # f16
        model = LlamaCppModel(
            self,
            spec,
            runner,
            tokenizer,
            context_length=context,
            memory_bytes=path.stat().st_size + kv + CACHE_RAM_MIB * (1 << 20),
            eos_token_ids=frozenset(eos),
        )
        with self._lock:
            self._models.append(model)
        return model

    def _spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._stopping:
                raise BackendUnavailable("the server is stopping")
            child = child_process(argv, **kwargs)
            self._loading.add(child)
        return child

    def interrupt(self) -> None:
        with self._lock:
            self._stopping = True
            children = list(self._loading)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()

    def shutdown(self) -> None:
        with self._lock:
            models = list(self._models)
        for model in models:
            model.close()


if __name__ == "__main__":  # _gguf_facts' child process
    try:
        read_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
    except LlamaServerError as exc:
        sys.exit(str(exc))
