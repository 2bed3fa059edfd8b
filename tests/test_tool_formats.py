"""Tool-call formats, their grammars and the answer readers, without a server: what each grammar
lets through (checked with llguidance against SmolLM2's tokenizer) and how text is split into
reasoning, content and calls however it is cut into pieces."""

from __future__ import annotations

import json
import subprocess
import sys

import llguidance
import llguidance.hf
import pytest

from inference.answer import AnswerReader, ReasoningReader
from inference.tools import (
    FORMAT_NAMES,
    ToolCallReader,
    ToolDef,
    after_reasoning,
    get_format,
    infer_format,
    json_grammar,
    template_renders_tools,
    tool_grammar,
)
from tests.helpers import ROOT, real_chat_template

WEATHER = ToolDef(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
NOW = ToolDef("now", None, None)
TOOLS = [WEATHER, NOW]
PARIS = ("get_weather", {"city": "Paris", "unit": "c"})


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm_dir)
    return hf, llguidance.hf.from_tokenizer(hf)


def accepts(tokenizer, lark: str, text: str) -> bool:
    hf, ll = tokenizer
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert not llguidance.LLMatcher.validate_grammar(grammar)
    matcher = llguidance.LLMatcher(ll, grammar)
    matcher.consume_tokens(hf.encode(text))
    return not matcher.is_error() and matcher.is_accepting()


def read(fmt, text: str, piece: int) -> ToolCallReader:
    reader = ToolCallReader(fmt)
    for i in range(0, len(text), piece):
        reader.feed(text[i : i + piece])
    reader.finish()
    return reader


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_each_format_reads_back_the_calls_it_writes_however_the_text_is_cut(name):
    fmt = get_format(name)
    calls = [PARIS] if name == "llama3_json" else [PARIS, ("now", {})]
    text = fmt.render(calls)
    for piece in (1, 3, len(text)):
        reader = read(fmt, text, piece)
        assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == calls
        assert reader.content == ""


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_required_grammars_take_calls_to_offered_tools_only(tokenizer, name):
    fmt = get_format(name)
    lark = tool_grammar(fmt, TOOLS, required=True, parallel=False)
    assert accepts(tokenizer, lark, fmt.render([PARIS]))
    assert not accepts(tokenizer, lark, "Sure, here it is.")
    assert not accepts(tokenizer, lark, fmt.render([("get_news", {"city": "Paris"})]))
    assert not accepts(tokenizer, lark, fmt.render([("get_weather", {"town": "Paris"})]))


@pytest.mark.parametrize("name", ["hermes", "mistral", "pythonic"])
def test_one_call_or_several_as_parallel_tool_calls_says(tokenizer, name):
    fmt = get_format(name)
    two = fmt.render([PARIS, ("now", {})])
    assert accepts(tokenizer, tool_grammar(fmt, TOOLS, required=True, parallel=True), two)
    assert not accepts(tokenizer, tool_grammar(fmt, TOOLS, required=True, parallel=False), two)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_auto_lets_text_through_and_holds_a_call_to_the_tools(tokenizer, name):
    fmt = get_format(name)
    lark = tool_grammar(fmt, TOOLS, required=False, parallel=True)
    assert accepts(tokenizer, lark, "It is sunny in Paris today.")
    assert accepts(tokenizer, lark, fmt.render([PARIS]))
    broken = fmt.render([("get_weather", {"town": 1})])
    assert not accepts(tokenizer, lark, broken)


def test_text_before_a_hermes_call_is_content_and_after_the_trigger_only_a_call(tokenizer):
    fmt = get_format("hermes")
    lark = tool_grammar(fmt, TOOLS, required=False, parallel=True)
    assert accepts(tokenizer, lark, "Let me look. " + fmt.render([PARIS]))
    assert not accepts(tokenizer, lark, "Let me look. <tool_call>\nthe weather please")
    reader = read(fmt, "Let me look.\n" + fmt.render([PARIS]), 2)
    assert reader.content == "Let me look."
    assert [c.name for c in reader.calls] == ["get_weather"]


def test_auto_with_a_response_format_answers_json_or_calls(tokenizer):
    fmt = get_format("hermes")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lark = tool_grammar(fmt, TOOLS, required=False, parallel=True, answer_schema=schema)
    assert accepts(tokenizer, lark, '{"a":1}')
    assert accepts(tokenizer, lark, fmt.render([PARIS]))
    assert not accepts(tokenizer, lark, "plain words")


def test_calls_are_compact_json(tokenizer):
    fmt = get_format("hermes")
    lark = tool_grammar(fmt, TOOLS, required=True, parallel=False)
    assert accepts(tokenizer, lark, '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>')
    assert not accepts(
        tokenizer, lark, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    )


def test_a_call_cut_short_stays_text():
    fmt = get_format("hermes")
    reader = read(fmt, '<tool_call>\n{"name":"get_weather","argu', 4)
    assert reader.calls == []
    assert reader.content == '<tool_call>\n{"name":"get_weather","argu'


def test_text_that_only_looks_like_the_trigger_is_released():
    reader = read(get_format("hermes"), "a <tool and <tool_cal", 1)
    assert reader.content == "a <tool and <tool_cal"


def test_templates_that_render_tools_are_told_from_those_that_do_not():
    assert template_renders_tools("{% for t in tools %}{{ t | tojson }}{% endfor %}")
    assert not template_renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_renders_tools(None)


def test_reading_calls_and_reasoning_loads_neither_mlx_nor_torch():
    """A llama.cpp or vLLM server's first chat would otherwise wait seconds for mlx-lm's package
    import (mlx, torch, scikit-learn) on the event loop."""
    script = """
import sys
from inference.answer import thinking_markers
from inference.tools import get_format, infer_format

class Vocab:
    def get_vocab(self):
        return {"<think>": 1, "</think>": 2}

assert thinking_markers(Vocab(), "auto") == ("<think>", "</think>")
assert infer_format("{{ tools }}<tool_call>\\n<function=", {}) == "qwen3_coder"
call = get_format("qwen3_coder").parse("<function=now>\\n</function>")
assert call, call
print(sorted(m for m in ("mlx", "mlx_lm", "torch", "sklearn") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_format_is_inferred_from_the_template():
    assert infer_format("{{ tools }}<tool_call>{{ tool_call.name }}</tool_call>", {}) == "hermes"
    assert infer_format("{{ tools }} [TOOL_CALLS] {{ x }}", {}) == "mistral"
    assert infer_format("{{ tools }}<|tool_call_start|>", {}) == "pythonic"
    assert infer_format('{{ tools }} {"name": function name, "parameters": dictionary', {}) == (
        "llama3_json"
    )


def test_reasoning_is_split_from_content_however_the_text_is_cut():
    text = "<think>\nCount the r's.\n</think>\n\nThere are three."
    for piece in (1, 2, 5, len(text)):
        reader = AnswerReader(reasoning=ReasoningReader(("<think>", "</think>"), opened=False))
        for i in range(0, len(text), piece):
            reader.feed(text[i : i + piece], token=1, final=False)
        reader.feed("", token=None, final=True)
        assert reader.reasoning_text == "\nCount the r's.\n"
        assert reader.content == "There are three."


def test_an_answer_without_reasoning_is_all_content_and_an_opened_one_starts_inside():
    plain = AnswerReader(reasoning=ReasoningReader(("<think>", "</think>"), opened=False))
    plain.feed("Hi", token=1, final=False)
    plain.feed(" there", token=1, final=True)
    assert (plain.reasoning_text, plain.content, plain.reasoning_tokens) == ("", "Hi there", 0)
    opened = AnswerReader(reasoning=ReasoningReader(("<think>", "</think>"), opened=True))
    for piece in ("Hm", "m.", "</think>", "Yes"):
        opened.feed(piece, token=1, final=False)
    opened.feed("", token=None, final=True)
    assert (opened.reasoning_text, opened.content, opened.reasoning_tokens) == ("Hmm.", "Yes", 3)


def test_constrained_output_starts_after_the_reasoning(tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    markers = ("<think>", "</think>")
    opened = after_reasoning(json_grammar(schema), markers, opened=True)
    assert accepts(tokenizer, opened, 'Think {"a": "x"} over.</think>\n{"a":2}')
    assert not accepts(tokenizer, opened, '{"a":2}')  # the reasoning must close first
    closed = after_reasoning(json_grammar(schema), markers, opened=False)
    assert accepts(tokenizer, closed, '{"a":2}')
    assert accepts(tokenizer, closed, '<think>hmm</think>{"a":2}')
    tool = after_reasoning(
        tool_grammar(get_format("hermes"), TOOLS, required=True, parallel=False), markers, True
    )
    assert accepts(
        tokenizer,
        tool,
        "Weather? <tool_call> it is.</think>\n" + get_format("hermes").render([PARIS]),
    )


# Real models' chat templates (from llama.cpp's source on PyPI), the format each one's model
# writes, and the text that ends its turns.
REAL_TEMPLATES = [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes", "<|im_end|>"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B", "hermes", "<|im_end|>"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3_json", "<|eot_id|>"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3_json", "<|eot_id|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", "<|im_end|>"),  # SmolLM2's EOS text
]


@pytest.mark.parametrize("name, family, end_of_turn", REAL_TEMPLATES)
def test_a_call_as_a_real_template_writes_it_is_read_back(tokenizer, name, family, end_of_turn):
    from inference.answer import THINK

    hf, _ = tokenizer
    template = real_chat_template(name)
    assert template_renders_tools(template)
    assert infer_format(template, hf.get_vocab()) == family
    tools = [WEATHER.openai()]
    user = [{"role": "user", "content": "Weather in Paris?"}]
    call_id = "abcdefghi"  # Mistral's templates take 9 letters and digits only
    function = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assistant = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": call_id, "type": "function", "function": function}],
    }
    prompt = hf.apply_chat_template(
        user, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    turn = hf.apply_chat_template(
        user + [assistant], tools=tools, chat_template=template, tokenize=False
    )
    assert turn.startswith(prompt)
    answer = turn[len(prompt) :].split(end_of_turn)[0]  # what the model wrote, its EOS aside
    reader = AnswerReader(
        reasoning=ReasoningReader(THINK, opened=False),
        tools=ToolCallReader(get_format(family)),
    )
    for ch in answer:
        reader.feed(ch, token=1, final=False)
    reader.feed("", token=None, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert reader.content == ""


def test_a_pythonic_template_is_recognised(tokenizer):
    hf, _ = tokenizer
    assert infer_format(real_chat_template("LFM2-8B-A1B"), hf.get_vocab()) == "pythonic"


def test_mistral_call_ids_are_nine_letters_and_digits_and_stable():
    from inference.tools import MistralFormat

    mapped = MistralFormat.call_id("call_0123456789abcdef01234567")
    assert len(mapped) == 9 and mapped.isalnum()
    assert MistralFormat.call_id("call_0123456789abcdef01234567") == mapped
    assert MistralFormat.call_id("abcdefghi") == "abcdefghi"


SPECIAL = ["[TOOL_CALLS]", "<|tool_call_start|>", "<|tool_call_end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def special_tokenizer(smollm_dir):
    """SmolLM2's tokenizer with the markers real Mistral, LFM2 and thinking models have as
    special tokens (never spelled by other tokens, skipped when detokenizing)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(smollm_dir)
    hf.add_special_tokens({"additional_special_tokens": SPECIAL})
    return hf, llguidance.hf.from_tokenizer(hf)


@pytest.mark.parametrize("name", ["mistral", "pythonic"])
def test_triggers_that_are_special_tokens_are_held_to_the_token(special_tokenizer, name):
    from inference.tools import special_markers

    hf, _ = special_tokenizer
    fmt = get_format(name)
    special = special_markers(hf, [fmt.start, fmt.end])
    assert set(special) == {m for m in (fmt.start, fmt.end) if m}
    call = fmt.render([PARIS])
    for required in (True, False):
        lark = tool_grammar(fmt, TOOLS, required=required, parallel=False, special=special)
        assert accepts(special_tokenizer, lark, ("" if required else "Sure. ") + call)
        assert not accepts(special_tokenizer, lark, fmt.start + "nonsense")
    auto = tool_grammar(fmt, TOOLS, required=False, parallel=False, special=special)
    assert accepts(special_tokenizer, auto, "Just text.")


def test_reasoning_closed_by_a_special_token_is_followed_by_the_constrained_answer(
    special_tokenizer,
):
    from inference.tools import special_markers

    hf, _ = special_tokenizer
    special = special_markers(hf, ["<think>", "</think>"])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    lark = after_reasoning(json_grammar(schema), ("<think>", "</think>"), True, special)
    assert accepts(special_tokenizer, lark, 'Some thought.</think>{"a":1}')
    assert not accepts(special_tokenizer, lark, '{"a":1}')
