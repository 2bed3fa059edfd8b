"""The mlx backend without HTTP: what our sgemm, the CPU parts and the eager prefill buy.

Run it from the repository root:

    .venv/bin/python bench/engine_bench.py [--model-path DIR] [--no-docs]

Three configurations, each in its own process (LD_PRELOAD is per process): mlx-lm's model on
OpenBLAS (what mlx_lm.server runs), ours (`inference.backends.mlx_cpu.install`) on OpenBLAS only, and
ours as `llm-service serve` runs it (our sgemm preloaded ahead of OpenBLAS).
1. Decode step: one forward pass of B sequences (B = 1, 4, 8, 16) over a 120-token context; median
   of three runs of 15 steps.
2. Burst (first and last configuration): 16 chat prompts (the serving benchmark's) arrive at once,
   max_tokens 64, greedy, driven through `MLXBatch.step()` as the scheduler does, twice in a row
   (the second burst finds the system prompt in the prefix cache, as in steady serving): mlx-lm's
   plain `BatchGenerator` and model, then as shipped. TTFT p50/max and tok/s of the second burst.
Results go to stdout and to docs/benchmarks.md between the engine_bench markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
START, END = "<!-- engine_bench:start -->", "<!-- engine_bench:end -->"


# (label, preload our sgemm, model variant, burst engine) -- each measured in its own process, since
# LD_PRELOAD is per process: the anchor's configuration, ours before our sgemm, ours as shipped.
CONFIGS = [
    ("mlx-lm, OpenBLAS", False, "plain", "mlx-lm"),
    ("ours, OpenBLAS only", False, "ours", None),
    ("ours as shipped (our sgemm + OpenBLAS)", True, "ours", "shipped"),
]


def preloads(sgemm: bool) -> list[str]:
    from llmservice.cli import blas_preloads, find_openblas

    if not sgemm:
        return [lib] if (lib := find_openblas()) else []
    libs = blas_preloads()
    if len(libs) < 2:
        raise SystemExit("engine_bench: our sgemm could not be built here (see cpu_blas.py)")
    return libs


def decode_steps(model_path: Path, variant: str, batches: list[int], context: int = 120) -> list:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from inference.backends import mlx_cpu
    from inference.backends.mlx import read_context_length

    model, _ = load(str(model_path))
    if variant == "ours":
        mlx_cpu.install(model, positions=read_context_length(str(model_path)))

    def step_ms(batch: int) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.random.randint(0, 1000, (batch, context)), cache=cache))
        token = mx.random.randint(0, 1000, (batch, 1))
        for _ in range(3):
            mx.eval(model(token, cache=cache))
        start = time.perf_counter()
        for _ in range(15):
            mx.eval(model(token, cache=cache))
        return (time.perf_counter() - start) / 15 * 1000

    return [statistics.median(step_ms(batch) for _ in range(3)) for batch in batches]


def burst(model_path: Path, shipped: bool, count: int = 16, max_tokens: int = 64) -> dict:
    """16 prompts at once through `MLXBatch.step()`: TTFT p50/max and tok/s."""
    from transformers import AutoTokenizer

    from bench.serve_bench import make_prompts
    from inference.backends import mlx, mlx_batching, mlx_cpu
    from inference.types import GenerationRequest, ModelSpec, SamplingParams

    saved = mlx_batching.supports, mlx_cpu.install
    if not shipped:
        mlx_batching.supports = lambda model: False
        mlx_cpu.install = lambda model, positions, **kwargs: False
    try:
        loaded = mlx.MLXBatch(ModelSpec(name="bench", path=str(model_path), max_batch_size=16))
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
    return result


def worker(args) -> int:
    """One configuration, in this process (preloaded by main): its numbers as JSON on stdout."""
    label, _, variant, engine = CONFIGS[args.worker]
    model_path = Path(args.model_path)
    batches = [int(b) for b in args.batches.split(",")]
    steps = decode_steps(model_path, variant, batches)
    print(f"{label}: " + ", ".join(f"B={b} {ms:.1f} ms" for b, ms in zip(batches, steps, strict=True)),
          file=sys.stderr, flush=True)  # fmt: skip
    result = {"steps": steps, "burst": None}
    if engine:
        result["burst"] = burst(model_path, shipped=engine == "shipped")
        b = result["burst"]
        print(f"{label}, burst: TTFT p50 {b['ttft_p50']:.2f} s, {b['tok_s']:.1f} tok/s",
              file=sys.stderr, flush=True)  # fmt: skip
    print(json.dumps(result))
    return 0


def report(results: list[dict], batches: list[int], model_path: Path) -> str:
    from importlib import metadata

    import mlx.core as mx

    labels = [c[0] for c in CONFIGS]
    lines = [
        "## The mlx backend without HTTP: decode step and burst",
        "",
        f"- Date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- Machine: nproc {os.cpu_count()}, {platform.platform()}, Python {platform.python_version()}, "
        f"mlx {metadata.version('mlx')}, mlx-lm {metadata.version('mlx-lm')}, device {mx.default_device()}",
        f"- Model: {model_path} (SmolLM2-135M-Instruct, float32); each configuration in its own "
        "process (LD_PRELOAD is per process)",
        "- Rerun: `.venv/bin/python bench/engine_bench.py`",
        "",
        "Decode step, one forward pass over a 120-token context (median of 3 runs of 15 steps):",
        "",
        "| batch | " + " | ".join(labels) + " | shipped vs mlx-lm |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for i, batch in enumerate(batches):
        ms = [r["steps"][i] for r in results]
        lines.append(
            f"| {batch} | " + " | ".join(f"{m:.1f} ms" for m in ms) + f" | {ms[0] / ms[-1]:.2f}x |"
        )
    lines += [
        "",
        "Burst of 16 chat prompts at once (max_tokens 64, greedy, prefix cache warm), through "
        "`MLXBatch.step()`:",
        "",
        "| engine | TTFT p50 | TTFT max | tok/s |",
        "|---|---|---|---|",
    ]
    for (label, _, _, engine), r in zip(CONFIGS, results, strict=True):
        if engine:
            b = r["burst"]
            name = "mlx-lm BatchGenerator, mlx-lm model, OpenBLAS" if engine == "mlx-lm" else label
            lines.append(
                f"| {name} | {b['ttft_p50']:.2f} s | {b['ttft_max']:.2f} s | {b['tok_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-path", help="a float32 mlx-lm folder (default: the serving bench's)"
    )
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker is not None:
        return worker(args)

    from bench.serve_bench import ensure_model

    model_path = ensure_model(args.model_path)
    results = []
    for i, (_, sgemm, _, _) in enumerate(CONFIGS):
        env = dict(os.environ, LD_PRELOAD=":".join(preloads(sgemm)))
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(i), "--model-path", str(model_path),
             "--batches", args.batches],
            env=env, stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    batches = [int(b) for b in args.batches.split(",")]
    section = report(results, batches, model_path)
    if not args.no_docs:
        from bench.serve_bench import write_docs

        write_docs(section, START, END)
    print("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
