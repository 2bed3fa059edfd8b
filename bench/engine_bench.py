"""The mlx backend without HTTP: what the CPU parts and the eager prefill buy, each against mlx-lm's own.

Run it from the repository root (it re-executes itself once with OpenBLAS preloaded, as the server does):

    .venv/bin/python bench/engine_bench.py [--model-path DIR] [--no-docs]

1. Decode step: one forward pass of B sequences (B = 1, 4, 8, 16) over a 120-token context, with
   mlx-lm's model as loaded and with `inference.backends.mlx_cpu.install` applied to a second copy.
   Runs alternate between the two, three rounds; the table shows the median.
2. Burst: 16 chat prompts (the serving benchmark's) arrive at once, max_tokens 64, greedy, driven
   through `MLXLoadedModel.step()` as the scheduler does, twice in a row (the second burst finds the
   system prompt in the prefix cache, as in steady serving): with mlx-lm's plain `BatchGenerator` and
   mlx's SwiGLU, then as shipped. Prints TTFT p50/max and tok/s of the second burst.
Results go to stdout and to docs/benchmarks.md between the engine_bench markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
START, END = "<!-- engine_bench:start -->", "<!-- engine_bench:end -->"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def reexec_with_openblas() -> None:
    if sys.platform.startswith("linux") and os.path.exists(OPENBLAS):
        if OPENBLAS not in os.environ.get("LD_PRELOAD", ""):
            env = dict(os.environ, LD_PRELOAD=f"{OPENBLAS}:{os.environ.get('LD_PRELOAD', '')}")
            os.execve(sys.executable, [sys.executable, *sys.argv], env)


def decode_steps(model_path: Path, batches: list[int], context: int = 120) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from inference.backends import mlx_cpu
    from inference.backends.mlx import read_context_length

    plain, _ = load(str(model_path))
    ours, _ = load(str(model_path))
    installed = mlx_cpu.install(ours, positions=read_context_length(str(model_path)))

    def step_ms(model, batch: int) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.random.randint(0, 1000, (batch, context)), cache=cache))
        token = mx.random.randint(0, 1000, (batch, 1))
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        start = time.perf_counter()
        for _ in range(15):
            mx.eval(model(token, cache=cache))
        return (time.perf_counter() - start) / 15 * 1000

    rows = []
    for batch in batches:
        times: dict[str, list[float]] = {"plain": [], "ours": []}
        for _ in range(3):
            times["plain"].append(step_ms(plain, batch))
            times["ours"].append(step_ms(ours, batch))
        p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
        rows.append({"batch": batch, "plain": p, "ours": o, "installed": installed})
        print(
            f"decode B={batch:2d}: mlx-lm {p:6.1f} ms  ours {o:6.1f} ms  ({p / o:.2f}x)", flush=True
        )
    return rows


def burst(model_path: Path, shipped: bool, count: int = 16, max_tokens: int = 64) -> dict:
    from transformers import AutoTokenizer

    from bench.serve_bench import make_prompts
    from inference.backends import mlx, mlx_batching, mlx_cpu
    from inference.types import GenerationRequest, ModelSpec, SamplingParams

    saved = mlx_batching.supports, mlx_cpu.install
    if not shipped:
        mlx_batching.supports = lambda model: False
        mlx_cpu.install = lambda model, positions: False
    try:
        loaded = mlx.MLXLoadedModel(
            ModelSpec(name="bench", path=str(model_path), max_batch_size=16)
        )
    finally:
        mlx_batching.supports, mlx_cpu.install = saved
    tok = AutoTokenizer.from_pretrained(str(model_path))
    params = SamplingParams(max_tokens=max_tokens, temperature=0)

    def one(attempt: int) -> dict:
        texts = make_prompts(count, count, attempt)
        start = time.perf_counter()
        for i, text in enumerate(texts):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            ids = tuple(tok.encode(prompt, add_special_tokens=False))
            loaded.add(i, GenerationRequest(str(i), loaded.spec, ids, params))
        first: dict[int, float] = {}
        done: set[int] = set()
        tokens = 0
        while len(done) < count:
            for seq, delta in loaded.step():
                if delta.token is not None:
                    tokens += 1
                    first.setdefault(seq, time.perf_counter() - start)
                if delta.finish_reason:
                    done.add(seq)
        wall = time.perf_counter() - start
        ttft = sorted(first.values())
        return {"ttft_p50": statistics.median(ttft), "ttft_max": ttft[-1], "tok_s": tokens / wall}

    one(1)  # fills the prefix cache, as a running server's is
    result = one(2)
    loaded.close()
    label = "as shipped" if shipped else "mlx-lm BatchGenerator, mlx SwiGLU"
    print(
        f"burst of {count} ({label}): TTFT p50 {result['ttft_p50']:.2f} s, "
        f"max {result['ttft_max']:.2f} s, {result['tok_s']:.1f} tok/s",
        flush=True,
    )
    return {"label": label, **result}


def report(steps: list[dict], bursts: list[dict], model_path: Path) -> str:
    from importlib import metadata

    import mlx.core as mx

    lines = [
        "## The mlx backend without HTTP: decode step and burst",
        "",
        f"- Date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- Machine: nproc {os.cpu_count()}, {platform.platform()}, Python {platform.python_version()}, "
        f"mlx {metadata.version('mlx')}, mlx-lm {metadata.version('mlx-lm')}, device {mx.default_device()}",
        f"- Model: {model_path} (SmolLM2-135M-Instruct, float32); BLAS: "
        + ("OpenBLAS (LD_PRELOAD)" if OPENBLAS in os.environ.get("LD_PRELOAD", "") else "bundled"),
        "- Rerun: `.venv/bin/python bench/engine_bench.py`",
        "",
        "Decode step, one forward pass over a 120-token context (median of 3 alternating rounds):",
        "",
        "| batch | mlx-lm model | with `mlx_cpu.install` | speed-up |",
        "|---|---|---|---|",
    ]
    for row in steps:
        lines.append(
            f"| {row['batch']} | {row['plain']:.1f} ms | {row['ours']:.1f} ms | "
            f"{row['plain'] / row['ours']:.2f}x |"
        )
    lines += [
        "",
        "Burst of 16 chat prompts at once (max_tokens 64, greedy, prefix cache warm), through "
        "`MLXLoadedModel.step()`:",
        "",
        "| engine | TTFT p50 | TTFT max | tok/s |",
        "|---|---|---|---|",
    ]
    for b in bursts:
        lines.append(
            f"| {b['label']} | {b['ttft_p50']:.2f} s | {b['ttft_max']:.2f} s | {b['tok_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-path", help="a float32 mlx-lm folder (default: the serving bench's)"
    )
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    reexec_with_openblas()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from bench.serve_bench import ensure_model

    model_path = ensure_model(args.model_path)
    steps = decode_steps(model_path, [int(b) for b in args.batches.split(",")])
    bursts = [burst(model_path, shipped=False), burst(model_path, shipped=True)]
    section = report(steps, bursts, model_path)
    if not args.no_docs:
        from bench.serve_bench import write_docs

        write_docs(section, START, END)
    print("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
