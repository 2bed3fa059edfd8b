"""POST /v1/chat/completions: messages (and tools) through the chat template; the answer's
reasoning, content and tool calls each in their own field, full or streamed."""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pydantic
from django.http import StreamingHttpResponse

from inference import protocol, tools
from inference.answer import (
    AnswerReader,
    ReasoningReader,
    prompt_opens_thinking,
    thinking_markers,
)
from inference.backends.base import LoadedModel
from inference.constraints import ConstraintError, json_constraint, lark_constraint
from inference.serving.base import (
    FINGERPRINT,
    Choice,
    Job,
    ModelDefaults,
    budget,
    chat_template,
    finite,
    load_model,
    reasoning_tokens,
    render_chat,
    resolve_model,
    run_to_end,
    sampling_params,
    stream_events,
    streaming_response,
    submit,
    token_texts,
)
from inference.types import Constraint, RequestStats
from llmservice.errors import APIError


@dataclass(frozen=True)
class ToolPlan:
    """How this request's tools reach the model and how its calls are read back."""

    fmt: tools.ToolFormat
    native: bool  # the chat template renders tools; else the generic tool prompt does
    listed: list[tools.ToolDef]  # shown to the model
    offered: list[tools.ToolDef]  # callable in this answer (none for tool_choice none)
    required: bool  # tool_choice required or a named function: the answer is calls only
    parallel: bool


def tool_plan(
    request: protocol.ChatCompletionRequest,
    defaults: ModelDefaults,
    template: str | None,
    model: LoadedModel,
) -> ToolPlan | None:
    in_history = any(m.tool_calls or m.role == "tool" for m in request.messages)
    if not request.tools and not in_history:
        return None
    if defaults.tool_parser == "none" and request.offered_tools():
        raise APIError(400, f"Model `{request.model}` is set not to call tools.", param="tools")
    native = tools.template_renders_tools(template)
    if defaults.tool_parser and defaults.tool_parser != "none":
        name = defaults.tool_parser
    elif native:
        name = _inferred_format(model, template)
    else:
        name = "hermes"
    fmt = tools.get_format(name)
    listed = [] if request.tool_choice == "none" else [_tool_def(t) for t in request.tools or []]
    named = isinstance(request.tool_choice, protocol.NamedToolChoice)
    return ToolPlan(
        fmt=fmt,
        native=native,
        listed=listed,
        offered=[_tool_def(t) for t in request.offered_tools()],
        required=request.tool_choice == "required" or named,
        parallel=request.parallel_tool_calls is not False,
    )


# Per tokenizer and template: inferring reads the vocabulary, too slow for every request.
_formats: weakref.WeakKeyDictionary[object, dict[str, str]] = weakref.WeakKeyDictionary()


def _inferred_format(model: LoadedModel, template: str) -> str:
    known = _formats.setdefault(model.tokenizer, {})
    if template not in known:
        known[template] = tools.infer_format(template, model.tokenizer.get_vocab())
    return known[template]


def _tool_def(tool: protocol.Tool) -> tools.ToolDef:
    f = tool.function
    return tools.ToolDef(f.name, f.description, f.parameters)


def _arguments(call: protocol.ToolCall) -> dict:
    try:
        value = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise APIError(
            400,
            f"The arguments of tool call `{call.id}` are not a JSON object.",
            param="messages",
        )
    return value


def chat_messages(
    request: protocol.ChatCompletionRequest, defaults: ModelDefaults, plan: ToolPlan | None
) -> list[dict]:
    messages = []
    mistral = plan is not None and isinstance(plan.fmt, tools.MistralFormat)
    ids = tools.MistralFormat.call_id if mistral else str
    for m in request.messages:
        message: dict = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        if m.tool_calls:
            calls = [(c.function.name, _arguments(c)) for c in m.tool_calls]
            if plan is not None and not plan.native:
                written = plan.fmt.render(calls)
                message["content"] = (
                    message["content"] + "\n" if message["content"] else ""
                ) + written
            else:
                message["tool_calls"] = [
                    {"id": ids(c.id), "type": "function", "function": {"name": n, "arguments": a}}
                    for c, (n, a) in zip(m.tool_calls, calls, strict=True)
                ]
        if m.role == "tool":
            if plan is not None and not plan.native:
                message = {
                    "role": "user",
                    "content": f"<tool_response>\n{message['content']}\n</tool_response>",
                }
            else:
                message["tool_call_id"] = ids(m.tool_call_id)
                if m.name:
                    message["name"] = m.name
        messages.append(message)
    system = [defaults.system_prompt] if defaults.system_prompt else []
    if plan is not None and not plan.native and plan.listed:
        system.append(tools.generic_tool_prompt(plan.fmt, plan.listed))
    if system:
        text = "\n\n".join(system)
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = text + "\n\n" + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": text})
    return messages


def template_kwargs(request: protocol.ChatCompletionRequest) -> dict:
    kwargs = dict(request.chat_template_kwargs or {})
    if request.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", request.reasoning_effort)
        if request.reasoning_effort == "none":
            kwargs.setdefault("enable_thinking", False)  # Qwen3's templates read this one
    return kwargs


def chat_logprobs(job: Job, entries: list[tuple[int, float, tuple]]) -> dict | None:
    if not job.params.logprobs:
        return None
    texts = token_texts(job.model)

    def item(token: int, logprob: float) -> dict:
        text, raw = texts.get(token)
        return {"token": text, "logprob": finite(logprob), "bytes": raw}

    content = []
    for token, logprob, top in entries:
        entry = item(token, logprob)
        entry["top_logprobs"] = [item(t, lp) for t, lp in top]
        content.append(entry)
    return {"content": content, "refusal": None}


def translated(
    build: Callable[[], protocol.ChatCompletionRequest],
) -> protocol.ChatCompletionRequest:
    """The chat request another API's request becomes (`build()`), or a 400 saying why not."""
    try:
        return build()
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{where}: {first.get('msg')}" if where else first["msg"]) from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def prepare_chat(
    request: protocol.ChatCompletionRequest,
    stats: RequestStats | None = None,
    allowed: tuple[str, ...] = (),
    *,
    read_answer: bool = False,
) -> Job:
    """`read_answer`: read every answer into reasoning, content and calls (the other APIs build
    their blocks and items from the reader), not only those with tools or reasoning."""
    spec, defaults = await resolve_model(request.model, stats, allowed)
    model = await load_model(spec)
    template = chat_template(model, spec)
    plan = tool_plan(request, defaults, template, model)
    listed = [t.openai() for t in plan.listed] if plan and plan.native and plan.listed else None
    prompt = render_chat(
        model, spec, chat_messages(request, defaults, plan), listed, template_kwargs(request)
    )
    markers = thinking_markers(model.tokenizer, defaults.reasoning_parser)
    opened = prompt_opens_thinking(model.tokenizer.decode(prompt[-8:]), markers)
    max_tokens = budget(model, spec, len(prompt), request.max_new_tokens(), defaults, "messages")
    top = request.top_logprobs or 0
    params = sampling_params(
        request,
        defaults,
        max_tokens,
        logprobs=bool(request.logprobs),
        top_logprobs=top,
        vocab=len(model.tokenizer),
    )
    reads_calls = plan is not None and bool(plan.offered)
    fmt = plan.fmt if reads_calls else None
    special = tools.special_markers(
        model.tokenizer, [fmt.start if fmt else None, fmt.end if fmt else None, *(markers or ())]
    )
    reader = None
    if markers or reads_calls or read_answer:
        reader = partial(_answer_reader, markers, opened, fmt)
    return Job(
        kind="chat",
        id=protocol.new_id("chatcmpl"),
        created=protocol.now(),
        spec=spec,
        model=model,
        prompts=[prompt],
        params=params,
        n=request.n or 1,
        stops=request.stop_list(),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        top_logprobs=top,
        stats=stats,
        constraint=output_constraint(request, model, plan, markers, opened, special),
        reader=reader,
        skip_special_tokens=not tools.any_skipped(model.tokenizer, special),
    )


def _answer_reader(
    markers: tuple[str, str] | None, opened: bool, fmt: tools.ToolFormat | None
) -> AnswerReader:
    return AnswerReader(
        reasoning=ReasoningReader(markers, opened) if markers else None,
        tools=tools.ToolCallReader(fmt) if fmt else None,
    )


def output_constraint(
    request: protocol.ChatCompletionRequest,
    model: LoadedModel,
    plan: ToolPlan | None,
    markers: tuple[str, str] | None = None,
    opened: bool = False,
    special: tools.Special | None = None,
) -> Constraint | None:
    """What the answer must match (response_format, required or named tool calls, the calls
    that follow a tool-call trigger), as a constraint every backend enforces, or a 400."""
    schema = None
    if request.constrained():
        schema = request.response_format.output_schema() or {"type": "object"}
    calls = plan.offered if plan is not None else []
    if schema is None and not calls:
        return None
    param = "response_format" if schema is not None else "tool_choice"
    # A backend that follows grammars its own way (llama.cpp) takes them as GBNF
    # (inference/gbnf.py), with no free-text regexes: forced calls, JSON, and either after a
    # reasoning the prompt has opened (its end marker triggers a lazy grammar). llguidance still
    # compiles each, so what it cannot enforce is the same 400 here as on every backend, and so
    # is what the engine itself refuses (`refusal`).
    as_gbnf = not model.capabilities.constrained
    if as_gbnf:
        if schema is None and not plan.required:
            return _lazy_calls(model, plan, special)
        grammars = model.capabilities.tool_grammars
        if (calls and not (plan.required and grammars)) or not model.capabilities.json_schema:
            what = "force tool calls" if calls else "constrain its output"
            raise APIError(400, f"Model `{request.model}`'s backend cannot {what}.", param=param)
        if markers is not None and not (opened and grammars):
            raise APIError(
                400,
                f"Model `{request.model}`'s backend can constrain an answer after reasoning only "
                "where the chat template opens the reasoning.",
                param=param,
            )
    if calls and not plan.fmt.constrainable:
        if plan.required or schema is not None:
            raise APIError(
                400,
                f"Model `{request.model}` writes tool calls as `{plan.fmt.name}`, which this "
                "server reads but cannot yet force: use tool_choice auto without "
                "response_format, or set the model's tool_parser.",
                param=param,
            )
        return None
    try:
        if calls:
            lark = tools.tool_grammar(
                plan.fmt,
                calls,
                required=plan.required,
                parallel=plan.parallel,
                answer_schema=schema,
                special=special,
            )
        elif markers is None:
            return _followed(model, json_constraint(schema), param)
        else:
            lark = tools.json_grammar(schema)
        trigger = None
        if markers is not None and as_gbnf:
            lark = tools.after_reasoning_end(lark, markers[1], special)
            trigger = (markers[1], (special or {}).get(markers[1]))
        elif markers is not None:
            lark = tools.after_reasoning(lark, markers, opened, special)
        constraint = dataclasses.replace(lark_constraint(lark), trigger=trigger)
    except ConstraintError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from exc
    return _followed(model, constraint, param)


def _lazy_calls(model: LoadedModel, plan: ToolPlan, special: tools.Special) -> Constraint | None:
    """`auto` on an engine without llguidance: free text (reasoning included), and the calls'
    grammar from the format's trigger on; else calls are read from free text, as for formats we
    cannot force."""
    trigger = plan.fmt.start
    if not (plan.offered and trigger and plan.fmt.constrainable):
        return None
    if not model.capabilities.tool_grammars:
        return None
    lark = tools.tool_grammar(
        plan.fmt, plan.offered, required=True, parallel=plan.parallel, special=special
    )
    try:
        constraint = lark_constraint(lark)
    except ConstraintError as exc:
        raise APIError(400, f"tools: {exc}", param="tools") from exc
    constraint = dataclasses.replace(constraint, trigger=(trigger, (special or {}).get(trigger)))
    return _followed(model, constraint, "tools")


def _followed(model: LoadedModel, constraint: Constraint, param: str) -> Constraint:
    if problem := model.refusal(constraint):
        raise APIError(400, f"{param}: {problem}", param=param)
    return constraint


def _finish_reason(choice: Choice) -> str | None:
    if choice.finish_reason == "stop" and choice.reader is not None and choice.reader.calls:
        return "tool_calls"
    return choice.finish_reason


def _message(choice: Choice) -> dict:
    message: dict = {"role": "assistant", "content": choice.text, "refusal": None}
    reader = choice.reader
    if reader is None:
        return message
    # No content beside reasoning or calls is null, as OpenAI's and vLLM's answers have it.
    message["content"] = reader.content or (None if reader.reasoning_text or reader.calls else "")
    if reader.reasoning is not None:
        message["reasoning_content"] = reader.reasoning_text or None
    if reader.calls:
        message["tool_calls"] = [call.wire() for call in reader.calls]
    return message


async def chat_full(job: Job) -> dict:
    choices = await run_to_end(job)
    body = []
    for c in choices:
        body.append(
            {
                "index": c.index,
                "message": _message(c),
                "logprobs": chat_logprobs(job, c.logprobs),
                "finish_reason": _finish_reason(c),
            }
        )
    return protocol.chat_completion(
        job.id,
        job.created,
        job.spec.name,
        body,
        job.usage(sum(c.tokens for c in choices), reasoning_tokens(choices)),
        FINGERPRINT,
    )


async def chat_stream(job: Job) -> StreamingHttpResponse:
    usage_field = {"usage": None} if job.include_usage else {}
    sent: dict[int, int] = {}  # logprob entries already sent, per choice
    calls_sent: dict[int, int] = {}  # tool calls already sent, per choice

    def frame(index: int, delta: dict, logprobs=None, finish: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return (
            protocol.chat_chunk(job.id, job.created, job.spec.name, [choice], FINGERPRINT)
            | usage_field
        )

    def first(index: int) -> dict:
        return frame(index, {"role": "assistant", "content": ""})

    def chunk(choice: Choice, text: str, final: bool) -> list[dict]:
        logprobs = None
        if job.params.logprobs:
            start = sent.get(choice.index, 0)
            logprobs = chat_logprobs(job, choice.logprobs[start:])
            sent[choice.index] = len(choice.logprobs)
        if choice.reader is None:
            delta = {"content": text} if text or not final else {}
            return [frame(choice.index, delta, logprobs, choice.finish_reason if final else None)]
        reasoning, content, calls = choice.reader.take()
        frames = []
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if delta or (logprobs and logprobs["content"]):
            frames.append(frame(choice.index, delta, logprobs))
        for call in calls:
            i = calls_sent.get(choice.index, 0)
            calls_sent[choice.index] = i + 1
            head = call.wire(i) | {"function": {"name": call.name, "arguments": ""}}
            frames.append(frame(choice.index, {"tool_calls": [head]}))
            tail = {"index": i, "function": {"arguments": call.arguments}}
            frames.append(frame(choice.index, {"tool_calls": [tail]}))
        if final:
            frames.append(frame(choice.index, {}, None, _finish_reason(choice)))
        return frames

    group = await submit(job)
    return streaming_response(stream_events(job, group, chunk, first), group)
