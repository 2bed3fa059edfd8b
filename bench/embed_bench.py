"""Embeddings throughput: our /v1/embeddings on each backend against sentence-transformers in
process, with the same model on the same machine, in one run.

Run it from the repository root on a quiet machine, after `make test` has fetched the model:

    .venv/bin/python bench/embed_bench.py                  # mlx and vllm
    .venv/bin/python bench/embed_bench.py --backends mlx

For each backend it starts `llm-service serve` with all-MiniLM-L6-v2 and measures inputs per
second at batch 1 (one input a request, 8 requests in flight: the server batches them) and at
batch 32 (32 inputs a request, one request at a time), then sentence-transformers encoding the
same inputs one at a time and 32 at a time. Results go to docs/benchmarks.md between its
embed_bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import constrained_bench as cb  # noqa: E402
import serve_bench as sb  # noqa: E402

MARK_START = "<!-- embed_bench:start -->"
MARK_END = "<!-- embed_bench:end -->"
MODEL = sb.REPO / ".cache" / "all-minilm-l6-v2"
SENTENCES = [
    f"Sentence number {i} is about {topic} and how it changes the way people work."
    for i, topic in enumerate(["rivers", "markets", "compilers", "gardens", "trains"] * 52)
]


def start(backend: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env, _ = sb.bench_env(data_dir, 32, backend)
    python = str(sb.VENV_BIN / "python")
    run = {"env": env, "cwd": sb.REPO, "check": True, "capture_output": True}
    subprocess.run([python, "manage.py", "migrate", "-v0"], **run)
    subprocess.run(
        [python, "manage.py", "import_model", str(MODEL), "--name", "embed"]
        + ["--backend", backend],
        **run,
    )
    if backend == "vllm":  # vLLM's KV space on a CPU: a fixed 0.5 GiB, not a share of RAM
        code = (
            "from models_app.models import LLMModel; r=LLMModel.objects.get(name='embed'); "
            "r.kv_cache_gb=0.5; r.full_clean(); r.save()"
        )
        subprocess.run([python, "manage.py", "shell", "--no-imports", "-c", code], **run)
    proc, url = cb.launch(backend, env, log)
    # The first request loads the model.
    embed_once(url, ["warm-up"])
    return proc, url


def embed_once(url: str, inputs: list[str]) -> None:
    response = httpx.post(
        url + "/v1/embeddings",
        json={"model": "embed", "input": inputs, "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {sb.API_KEY}"},
        timeout=600,
    )
    response.raise_for_status()


async def server_rate(url: str, batch: int, in_flight: int) -> float:
    """Inputs per second over all SENTENCES, `batch` inputs a request, `in_flight` at once."""
    chunks = [SENTENCES[i : i + batch] for i in range(0, len(SENTENCES), batch)]
    headers = {"Authorization": f"Bearer {sb.API_KEY}"}
    limit = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:

        async def one(inputs: list[str]) -> None:
            async with limit:
                body = {"model": "embed", "input": inputs, "encoding_format": "base64"}
                (await client.post("/v1/embeddings", json=body)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        return len(SENTENCES) / (time.perf_counter() - started)


def reference_rates() -> tuple[float, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MODEL), device="cpu")
    model.encode(SENTENCES[:8])
    started = time.perf_counter()
    for sentence in SENTENCES:
        model.encode([sentence])
    one = len(SENTENCES) / (time.perf_counter() - started)
    started = time.perf_counter()
    model.encode(SENTENCES, batch_size=32)
    many = len(SENTENCES) / (time.perf_counter() - started)
    return one, many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,vllm")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        raise SystemExit(f"{MODEL} is missing: run `make test` first (it fetches the model)")
    sb.LOG_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in args.backends.split(","):
        data_dir = Path(tempfile.mkdtemp(prefix=f"embed-{backend}-"))
        proc, url = start(backend, data_dir, sb.LOG_DIR / f"embed-{backend}.log")
        try:
            one = asyncio.run(server_rate(url, 1, 8))
            many = asyncio.run(server_rate(url, 32, 1))
            rows.append((backend, one, many))
            print(f"{backend}: {one:.0f} inputs/s at batch 1, {many:.0f} at 32", flush=True)
        finally:
            cb.stop(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
    ref_one, ref_many = reference_rates()
    print(f"sentence-transformers: {ref_one:.0f} inputs/s at batch 1, {ref_many:.0f} at 32")
    lines = [
        "## Embeddings: /v1/embeddings against sentence-transformers",
        "",
        f"- Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; all-MiniLM-L6-v2 "
        f"(float32); {len(SENTENCES)} sentences of about 16 tokens. Batch 1: one input a "
        "request, 8 requests in flight (the server batches them); batch 32: 32 inputs a "
        "request, one at a time. sentence-transformers runs in the bench's process on the CPU "
        "(torch), encoding one sentence a call, then 32 a call.",
        "- Rerun: `.venv/bin/python bench/embed_bench.py`",
        "",
        "| server | batch 1 inputs/s | vs reference | batch 32 inputs/s | vs reference |",
        "|---|---|---|---|---|",
    ]
    for backend, one, many in rows:
        lines.append(
            f"| ours on {backend} | {one:.0f} | {one / ref_one:.2f}x | {many:.0f} | "
            f"{many / ref_many:.2f}x |"
        )
    lines.append(f"| sentence-transformers | {ref_one:.0f} | 1.00x | {ref_many:.0f} | 1.00x |")
    section = "\n".join(lines)
    print(section)
    if not args.no_docs:
        sb.write_docs(section, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
