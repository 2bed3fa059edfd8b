"""The llamacpp backend: GGUF files served as shipped by llama.cpp's own llama-server, through the
openai SDK. The engine is real (built by `make setup`), the model is the real SmolLM2 GGUF."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import struct

import httpx
import jsonschema
import openai
import psutil
import pytest
import transformers
from pydantic import BaseModel, Field

from tests.conftest import llamacpp_tested_here
from tests.helpers import API_KEY, Server, demo_gguf_path, kquant_gguf_path, wait_until
from tests.test_disconnects import labelled
from tests.test_tools import TOOLS, assert_valid_calls

pytestmark = pytest.mark.skipif(
    not llamacpp_tested_here(), reason="`make setup` builds llama-server on Linux only"
)

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def rows(server: Server, sql: str) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "db.sqlite3") as db:
        return db.execute(sql).fetchall()


def test_a_gguf_file_is_registered_as_it_is_and_served_by_llama_cpp(llamacpp_real_server):
    [(path, fmt, backend)] = rows(
        llamacpp_real_server,
        "SELECT path, format, backend FROM models_app_llmmodel WHERE name = 'smollm2'",
    )
    assert (path, fmt, backend) == (str(demo_gguf_path().resolve()), "gguf", "llamacpp")
    client = llamacpp_real_server.openai()
    reply = client.chat.completions.create(
        model="smollm2", messages=PARIS, max_tokens=20, temperature=0
    )
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model="smollm2", messages=PARIS, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    ready = httpx.get(llamacpp_real_server.url + "/ready", timeout=10).json()
    assert ready["backends"]["smollm2"] == "llamacpp"


def test_characters_split_across_tokens_come_out_whole(llamacpp_real_server):
    """llama-server streams a token that ends mid-character only with the token completing it."""
    client = llamacpp_real_server.openai()
    prompt = "<|im_start|>user\nWrite in Chinese.<|im_end|>\n<|im_start|>assistant\n你好"
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert "\ufffd" not in text and "我" in text, text
    assert (full.choices[0].finish_reason, full.usage.completion_tokens) == ("length", 30)
    stream = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=30, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_tokens_streamed_only_with_the_next_one_are_still_counted(llamacpp_server, tiny_dir):
    """A token that leaves half a character comes from llama-server only inside the next one's
    text, and one at the end never comes: usage still counts every token generated, and the
    streamed text is the full answer's. The bias makes the model alternate between such a
    token and a word, so that the answer takes both paths."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    broken, word = tokenizer.convert_tokens_to_ids(["ĠâĢ", "Ġarts"])
    client = llamacpp_server.openai()
    ask = dict(model="tiny", prompt="a", max_tokens=12, temperature=0, frequency_penalty=2)
    full = client.completions.create(**ask, logit_bias={str(broken): 100, str(word): 100})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12
    assert set(text.split()) == {"\ufffd", "arts"}, text
    stream = client.completions.create(
        **ask,
        logit_bias={str(broken): 100, str(word): 100},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12
    # A long run of them (about 20) before the first word, as a random model can give.
    run = client.completions.create(
        **(ask | {"max_tokens": 40}), logit_bias={str(broken): 100, str(word): 60}
    )
    assert run.usage.completion_tokens == 40
    assert run.choices[0].text.startswith(" \ufffd" * 16)
    assert set(run.choices[0].text.split()) == {"\ufffd", "arts"}
    only_broken = client.completions.create(**ask, logit_bias={str(broken): 100})
    assert (only_broken.choices[0].text, only_broken.usage.completion_tokens) == ("", 12)
    # Half a character, then the end (the penalty divides the bias of a token already chosen):
    # the end token is not counted, as on every backend.
    ended = client.completions.create(
        **(ask | {"frequency_penalty": 0}),
        logit_bias={str(broken): 100, str(tokenizer.eos_token_id): 90},
        extra_body={"repetition_penalty": 1.5},
    )
    assert ended.choices[0].finish_reason == "stop"
    assert (ended.choices[0].text, ended.usage.completion_tokens) == ("", 1)


def test_sampling_parameters_hold_on_llama_cpp(llamacpp_real_server):
    client = llamacpp_real_server.openai()

    def ask(**kwargs):
        return client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell me a story about a dragon."}],
            **{"max_tokens": 12, **kwargs},
        )

    seeded = [ask(temperature=1.0, seed=s).choices[0].message.content for s in (1, 1, 2, 3)]
    assert seeded[0] == seeded[1]  # the same seed, the same answer
    assert len(set(seeded[1:])) > 1  # other seeds, other answers
    cut = ask(temperature=0, max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    whole = ask(temperature=0, max_tokens=20).choices[0].message.content
    word = whole.split()[2]
    stopped = ask(temperature=0, max_tokens=20, stop=[word])
    assert stopped.choices[0].message.content == whole[: whole.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    two = ask(temperature=1.0, n=2, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    first = ask(temperature=0, max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    assert first.top_logprobs == []
    probed = ask(temperature=0, max_tokens=1, logprobs=True, top_logprobs=3)
    lp = probed.choices[0].logprobs.content[0]
    assert lp.token == first.token and lp.logprob == pytest.approx(first.logprob)
    assert lp.logprob <= 0
    assert len(lp.top_logprobs) == 3
    assert lp.top_logprobs[0].token == lp.token
    assert bytes(lp.bytes).decode() == lp.token
    assert all(t.logprob <= lp.top_logprobs[0].logprob for t in lp.top_logprobs)


def test_a_greedy_answer_takes_the_most_likely_token_at_every_step(llamacpp_real_server):
    reply = llamacpp_real_server.openai().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me a story about a dragon."}],
        max_tokens=24,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    steps = reply.choices[0].logprobs.content
    assert len(steps) == 24
    for step in steps:
        assert step.token == step.top_logprobs[0].token
        assert step.logprob == pytest.approx(step.top_logprobs[0].logprob)
        assert step.top_logprobs[1].logprob <= step.logprob <= 0


def test_logit_bias_and_penalties_change_the_answer(llamacpp_real_server):
    client = llamacpp_real_server.openai()
    greedy = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=1, temperature=0, logprobs=2
    )
    top = greedy.choices[0].logprobs.top_logprobs[0]
    assert len(top) == 2
    first = greedy.choices[0].text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(demo_gguf_path().parent), gguf_file=demo_gguf_path().name
    )
    [banned] = tokenizer.encode(first, add_special_tokens=False)
    biased = client.completions.create(
        model="smollm2",
        prompt="1, 2, 3, 4,",
        max_tokens=1,
        temperature=0,
        logit_bias={str(banned): -100},
    )
    assert biased.choices[0].text != first
    # penalties count the tokens already there: a list that repeats itself no longer does
    plain = client.completions.create(
        model="smollm2", prompt="apple, apple, apple,", max_tokens=12, temperature=0
    )
    penalised = client.completions.create(
        model="smollm2",
        prompt="apple, apple, apple,",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert plain.choices[0].text.count("apple") > penalised.choices[0].text.count("apple")


def test_a_repeated_prompt_is_served_from_the_prefix_cache(llamacpp_real_server):
    client = llamacpp_real_server.openai()
    long = [{"role": "user", "content": "Summarise: " + "the cat sat on the mat. " * 40}]
    client.chat.completions.create(model="smollm2", messages=long, max_tokens=2, temperature=0)
    again = client.chat.completions.create(
        model="smollm2", messages=long, max_tokens=2, temperature=0
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens - 2 <= cached < again.usage.prompt_tokens


async def _drop_after_first_token(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Count to a thousand."}],
                "max_tokens": 2000,
                "stream": True,
                "logit_bias": {"2": -100},  # no end of text: it would go on
            },
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    return  # leaving the block closes the connection


def test_a_request_waits_for_the_requests_still_being_parsed(monkeypatch, tmp_path):
    """A burst is parsed one request at a time; sent to llama-server together, its prompts
    prefill in one step instead of one each (the step loop's bursts, test_engine)."""
    from inference.backends import llamacpp
    from llmservice.env import llama_server_build

    monkeypatch.setattr(llamacpp, "BURST_MAX", 3600.0)  # the deadline never decides here
    backend = llamacpp.LlamaCppBackend(server=llama_server_build(), cache_dir=tmp_path)

    async def main():
        backend.announce(1)  # another request of the burst is still being parsed
        gathered = asyncio.ensure_future(backend.burst_gathered())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not gathered.done()
        backend.announce(-1)  # it is submitted
        await asyncio.wait_for(gathered, 60)
        await asyncio.wait_for(backend.burst_gathered(), 60)  # nothing announced: no wait

    asyncio.run(main())


def smt_sysfs(root, siblings: dict[int, str]):
    """A sysfs CPU topology, standing in for a machine with SMT (this one has none)."""
    for cpu, shared in siblings.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(shared + "\n")
    return str(root)


def test_runners_default_to_one_thread_per_physical_core(tmp_path):
    """llama.cpp's own default, and what Ollama's docs recommend: a core's SMT sibling adds little
    arithmetic, and it is where our server streams from."""
    from inference.backends import llamacpp
    from inference.types import ModelSpec
    from llmservice.env import llama_server_build

    sysfs = smt_sysfs(tmp_path / "cpu", {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert llamacpp.physical_cores({0, 1, 2, 3}, sysfs) == 2
    assert llamacpp.physical_cores({0, 2}, sysfs) == 1  # both siblings of one core
    assert llamacpp.physical_cores({0, 1, 2, 3}, str(tmp_path / "none")) == 4  # no topology

    backend = llamacpp.LlamaCppBackend(server=llama_server_build(), cache_dir=tmp_path / "cache")
    assert backend.threads == llamacpp.physical_cores() >= 1
    spec = ModelSpec(name="smollm2", path=str(demo_gguf_path()), backend="llamacpp")
    args = backend.args(spec, 4096)
    assert args[args.index("--threads") + 1] == str(backend.threads)
    explicit = llamacpp.LlamaCppBackend(server=llama_server_build(), threads=3, cache_dir=tmp_path)
    assert explicit.threads == 3


def test_requests_share_the_batch_and_a_dropped_stream_frees_its_slot(llamacpp_real_server):
    async def four() -> None:
        await asyncio.gather(*(_drop_after_first_token(llamacpp_real_server) for _ in range(4)))

    asyncio.run(four())
    wait_until(
        lambda: labelled(llamacpp_real_server, "llm_engine_requests", model="smollm2") == 0,
        timeout=60,
    )
    assert llamacpp_real_server.metric("llm_running_sequences") == 0
    reply = llamacpp_real_server.openai().chat.completions.create(
        model="smollm2", messages=PARIS, max_tokens=20, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    # one cancelled row each, once the analytics buffer is written
    wait_until(
        lambda: (
            rows(
                llamacpp_real_server,
                "SELECT COUNT(*) FROM analytics_requestlog WHERE outcome = 'cancelled'",
            )[0][0]
            == 4
        ),
        timeout=60,
    )


def test_a_runner_that_dies_mid_answer_ends_it_with_an_error_and_the_next_request_restarts_it(
    llamacpp_real_server,
):
    client = llamacpp_real_server.openai()
    client.chat.completions.create(model="smollm2", messages=PARIS, max_tokens=1)  # loaded

    def runner() -> psutil.Process:
        server = psutil.Process(llamacpp_real_server.proc.pid)
        [found] = [
            p
            for p in server.children(recursive=True)
            if p.name() == "llama-server" and "smollm2" in p.cmdline()
        ]
        return found

    first = runner()
    story = [{"role": "user", "content": "Write a very long story about a fox and a crow."}]
    events = []
    with httpx.Client(base_url=llamacpp_real_server.url, timeout=300) as http:
        body = {"model": "smollm2", "messages": story, "max_tokens": 1000, "stream": True}
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 2:
                        first.kill()
    assert "choices" in events[1]  # the answer had begun
    error = events[-1]["error"]
    assert "llama-server exited (killed by SIGKILL)" in error["message"]
    assert error["type"] == "server_error"
    reply = client.chat.completions.create(
        model="smollm2", messages=PARIS, max_tokens=20, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert runner().pid != first.pid


def test_more_requests_than_slots_and_queue_get_429_with_retry_after(llamacpp_real_server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=llamacpp_real_server.url, timeout=300) as http:
            body = {"model": "smollm2", "messages": PARIS, "max_tokens": 8, "temperature": 0}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            return await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body, headers=headers) for _ in range(20))
            )

    responses = asyncio.run(burst())
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 429} and 200 in statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["Retry-After"]
        else:
            assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_structured_outputs_hold_on_llama_cpp(llamacpp_real_server):
    client = llamacpp_real_server.openai()
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    # SmolLM2 may repeat keys until max_tokens here, but what it writes is an object
    assert reply.choices[0].message.content.startswith("{")

    class Capital(BaseModel):
        country: str = Field(max_length=20)
        capital: str = Field(max_length=20)

    parsed = client.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital,
        max_tokens=60,
        temperature=0,
    )
    assert "Paris" in parsed.choices[0].message.parsed.capital
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "cat", "schema": CAT, "strict": True},
        },
        max_tokens=80,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CAT)


CAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "colour": {"enum": ["black", "white", "ginger"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}


def test_integer_ranges_hold_and_a_number_bound_is_refused_not_loosened(llamacpp_real_server):
    client = llamacpp_real_server.openai()
    dated = {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "count": {"type": "integer", "exclusiveMinimum": -1},
            "offset": {"type": "integer", "maximum": -3},
        },
        "required": ["year", "count", "offset"],
        "additionalProperties": False,
    }
    for seed in range(3):
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "A year, a count and an offset, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": dated}},
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), dated)
    priced = {"type": "object", "properties": {"euros": {"type": "number", "minimum": 0.5}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "A price."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": priced}},
        )
    assert caught.value.body["param"] == "response_format"
    assert "'minimum'" in caught.value.body["message"]


def test_tool_choice_auto_gives_valid_calls_or_plain_words(llamacpp_real_server):
    """auto: free text, and from the format's trigger on the calls' grammar (a lazy grammar)."""
    client = llamacpp_real_server.openai()
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    auto = client.chat.completions.create(
        model="smollm2", messages=weather, tools=TOOLS, max_tokens=60, temperature=0
    )
    choice = auto.choices[0]
    if choice.finish_reason == "tool_calls":
        assert_valid_calls(choice.message)
    else:  # an answer in words is the model's choice under auto, and it is not a call's text
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content and not choice.message.tool_calls


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "pythonic"])
def test_every_tool_call_format_is_forced_through_llama_cpp_grammars(llamacpp_real_server, parser):
    """tool_choice required or named: the same lark grammar as on the other backends, as GBNF."""
    client = llamacpp_real_server.openai()
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]

    def ask(choice, **kwargs):
        return client.chat.completions.create(
            model="smollm2",
            messages=weather,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=120,
            temperature=0,
            parallel_tool_calls=False,
            **kwargs,
        )

    llamacpp_real_server.set_model("smollm2", tool_parser=parser)
    try:
        required = ask("required")
        named = ask({"type": "function", "function": {"name": "get_time"}})
        stream = list(ask("required", stream=True))
    finally:
        llamacpp_real_server.set_model("smollm2", tool_parser="")
    assert required.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(required.choices[0].message)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    assert_valid_calls(named.choices[0].message)
    streamed = "".join(
        part.function.arguments or ""
        for chunk in stream
        if chunk.choices
        for part in chunk.choices[0].delta.tool_calls or []
    )
    assert streamed == required.choices[0].message.tool_calls[0].function.arguments


def test_a_bound_llama_cpp_cannot_enforce_is_refused_not_loosened(llamacpp_real_server):
    client = llamacpp_real_server.openai()
    price = {
        "type": "function",
        "function": {
            "name": "set_price",
            "parameters": {
                "type": "object",
                "properties": {"euros": {"type": "number", "minimum": 0.5}},
                "required": ["euros"],
            },
        },
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Set the price to 3 euros."}],
            tools=[price],
            tool_choice="required",
        )
    assert caught.value.body["param"] == "tool_choice"
    assert "'minimum'" in caught.value.body["message"]


def test_a_stop_ends_a_model_load_in_progress_instead_of_waiting_for_it(tmp_path):
    """Ctrl-C on a first start, while the demo GGUF's vocabulary is still being converted, used to
    wait for the whole load; the conversion is a child process the stop kills."""
    from concurrent.futures import ThreadPoolExecutor

    from django.conf import settings

    from inference.backends.base import BackendUnavailable
    from inference.backends.llamacpp import LlamaCppBackend
    from inference.types import ModelSpec

    backend = LlamaCppBackend(server=settings.LLAMA_SERVER, cache_dir=tmp_path)
    spec = ModelSpec(name="smollm2", path=str(demo_gguf_path()), backend="llamacpp")
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(backend.load, spec)
        wait_until(lambda: backend._loading or load.done(), timeout=120)
        children = list(backend._loading)
        backend.interrupt()
        with pytest.raises(BackendUnavailable, match="stopping"):
            load.result()
    assert children and all(child.wait() == -signal.SIGKILL for child in children)
    assert list((tmp_path / "llamacpp").iterdir()) == []  # no half-written conversion left


def test_a_truncated_gguf_is_refused_at_import_with_a_clear_error(llamacpp_real_server, tmp_path):
    truncated = tmp_path / "half.gguf"
    truncated.write_bytes(demo_gguf_path().read_bytes()[:40_000_000])
    result = llamacpp_real_server.manage(
        "import_model", str(truncated), "--backend", "llamacpp", check=False
    )
    assert result.returncode != 0
    assert "truncated" in result.stderr and "half.gguf" in result.stderr
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    result = llamacpp_real_server.manage("import_model", str(not_gguf), check=False)
    assert result.returncode != 0 and "not a GGUF file" in result.stderr


def _gguf_without_weights(path, architecture: str) -> None:
    """A well-formed GGUF header naming `architecture`, with SmolLM2's vocabulary metadata
    copied over and no tensors: llama.cpp itself must refuse to load it."""
    import gguf

    source = gguf.GGUFReader(str(demo_gguf_path()))
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, field in source.fields.items():
        if name.startswith("tokenizer.") and name != "tokenizer.chat_template":
            value = field.contents()
            kind = field.types[0]
            if kind == gguf.GGUFValueType.ARRAY:
                writer.add_array(name, value)
            elif kind == gguf.GGUFValueType.STRING:
                writer.add_string(name, value)
            elif kind == gguf.GGUFValueType.BOOL:
                writer.add_bool(name, value)
            else:
                writer.add_uint32(name, int(value))
    writer.add_context_length(512)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert struct.unpack("<I", path.read_bytes()[:4])[0] == struct.unpack("<I", b"GGUF")[0]


def test_a_gguf_llama_cpp_cannot_load_answers_503_with_its_reason(llamacpp_real_server, tmp_path):
    broken = tmp_path / "empty-llama.gguf"
    _gguf_without_weights(broken, "llama")
    llamacpp_real_server.manage("import_model", str(broken), "--name", "broken-gguf")
    with llamacpp_real_server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": "broken-gguf", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "llama-server exited" in error["message"]
    reply = llamacpp_real_server.openai().chat.completions.create(
        model="smollm2", messages=PARIS, max_tokens=20, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content  # the others keep working


def test_a_k_quant_gguf_is_served_as_shipped(llamacpp_real_server):
    """Gemma 3 270M in Q4_K_M (a SentencePiece vocabulary of 262k tokens): mlx cannot read
    K-quants, so even a machine with a GPU registers it for llama.cpp."""
    llamacpp_real_server.manage("import_model", str(kquant_gguf_path()), "--name", "gemma3")
    [(fmt, backend)] = rows(
        llamacpp_real_server,
        "SELECT format, backend FROM models_app_llmmodel WHERE name = 'gemma3'",
    )
    assert (fmt, backend) == ("gguf", "llamacpp")
    client = llamacpp_real_server.openai()
    reply = client.completions.create(
        model="gemma3", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "France" in reply.choices[0].text or "Paris" in reply.choices[0].text
    assert reply.usage.prompt_tokens == 6  # <bos> first, as the GGUF asks
    assert reply.choices[0].finish_reason == "length"
    # chat: a base model without a template continues a plain transcript, as on mlx
    chat = client.chat.completions.create(model="gemma3", messages=PARIS, max_tokens=8)
    assert chat.choices[0].message.content is not None
