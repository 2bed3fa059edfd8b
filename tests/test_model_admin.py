"""The registry's admin: per-model settings with validation, and the default/enable actions."""

from __future__ import annotations

import pytest

from models_app.models import LLMModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def models():
    a = LLMModel.objects.create(name="a", path="/a", is_default=True)
    b = LLMModel.objects.create(name="b", path="/b")
    return a, b


def settings_form(row: LLMModel, **changes) -> dict:
    data = {
        "name": row.name,
        "aliases": "[]",
        "enabled": "on",
        "backend": "auto",
        "kind": "chat",
        "pooling": "",
        "system_prompt": "",
        "chat_template": "",
        "tool_parser": "",
        "reasoning_parser": "auto",
        "dtype": "auto",
        "tensor_parallel_size": "1",
        "pipeline_parallel_size": "1",
        "enforce_eager": "unknown",
        "engine_args": "{}",
    }
    data.update(changes)
    return data


def test_settings_are_saved_from_the_change_form(admin_client, models):
    a, _ = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/",
        settings_form(
            a,
            default_temperature="0.3",
            context_length="512",
            max_batch_size="4",
            keep_alive_seconds="60",
        ),
    )
    assert response.status_code == 302, response.content
    a.refresh_from_db()
    assert (a.default_temperature, a.context_length, a.max_batch_size, a.keep_alive_seconds) == (
        0.3,
        512,
        4,
        60,
    )


def test_the_tool_and_reasoning_parsers_are_saved_from_the_change_form(admin_client, models):
    a, _ = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/",
        settings_form(a, tool_parser="mistral", reasoning_parser="none"),
    )
    assert response.status_code == 302, response.content
    a.refresh_from_db()
    assert (a.tool_parser, a.reasoning_parser) == ("mistral", "none")
    page = admin_client.get(f"/admin/models_app/llmmodel/{a.pk}/change/").content.decode()
    assert 'value="pythonic"' in page and "reasoning_content" in page


def test_the_backend_and_vllm_engine_settings_are_saved_from_the_change_form(admin_client, models):
    a, _ = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/",
        settings_form(
            a,
            backend="vllm",
            dtype="bfloat16",
            gpu_memory_utilization="0.5",
            kv_cache_gb="1.5",
            tensor_parallel_size="2",
            quantization="fp8",
            enforce_eager="true",
            engine_args='{"max_num_batched_tokens": 512}',
        ),
    )
    assert response.status_code == 302, response.content
    a.refresh_from_db()
    assert (a.backend, a.dtype, a.gpu_memory_utilization, a.kv_cache_gb) == (
        "vllm",
        "bfloat16",
        0.5,
        1.5,
    )
    assert (a.tensor_parallel_size, a.quantization, a.enforce_eager) == (2, "fp8", True)
    assert a.engine_args == {"max_num_batched_tokens": 512}


@pytest.mark.parametrize(
    "engine_args, message",
    [
        ('{"no_such_argument": 1}', "vLLM has no engine argument `no_such_argument`"),
        ('{"max_model_len": 99}', "the context length field"),
        ("[1, 2]", "A JSON object"),
    ],
)
def test_engine_args_that_vllm_lacks_or_other_fields_set_are_refused(
    admin_client, models, engine_args, message
):
    a, _ = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/", settings_form(a, engine_args=engine_args)
    )
    assert response.status_code == 200
    assert message in str(response.context["adminform"].form.errors["engine_args"])
    a.refresh_from_db()
    assert a.engine_args == {}


def test_the_backend_of_a_gguf_file_is_shown_and_only_engines_that_read_it_are_accepted(
    admin_client, models
):
    gguf = LLMModel.objects.create(
        name="g", path="/m.gguf", format=LLMModel.Format.GGUF, backend="llamacpp"
    )
    page = admin_client.get(f"/admin/models_app/llmmodel/{gguf.pk}/change/").content.decode()
    assert '<option value="llamacpp" selected>' in page
    refused = admin_client.post(
        f"/admin/models_app/llmmodel/{gguf.pk}/change/", settings_form(gguf, backend="mlx")
    )
    assert refused.status_code == 200
    assert "which llamacpp serves as it is" in refused.content.decode()
    a, _ = models  # a folder: llamacpp cannot read it
    refused = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/", settings_form(a, backend="llamacpp")
    )
    assert "llamacpp serves GGUF files" in refused.content.decode()
    gguf.refresh_from_db()
    a.refresh_from_db()
    assert (gguf.backend, a.backend) == ("llamacpp", "auto")


def test_out_of_range_settings_get_validation_messages(admin_client, models):
    a, _ = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{a.pk}/change/",
        settings_form(a, default_temperature="3", default_top_p="1.5"),
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "default_temperature" in errors and "default_top_p" in errors
    a.refresh_from_db()
    assert a.default_temperature is None


def test_an_alias_taken_by_another_model_is_refused(admin_client, models):
    a, b = models
    response = admin_client.post(
        f"/admin/models_app/llmmodel/{b.pk}/change/", settings_form(b, aliases='["a"]')
    )
    assert "already names model a" in response.content.decode()


def test_the_make_default_action_moves_the_default(admin_client, models):
    a, b = models
    admin_client.post(
        "/admin/models_app/llmmodel/", {"action": "make_default", "_selected_action": [b.pk]}
    )
    assert list(LLMModel.objects.filter(is_default=True).values_list("name", flat=True)) == ["b"]


def test_disable_and_enable_actions(admin_client, models):
    a, b = models
    admin_client.post(
        "/admin/models_app/llmmodel/", {"action": "disable", "_selected_action": [a.pk, b.pk]}
    )
    assert not LLMModel.objects.filter(enabled=True).exists()
    admin_client.post(
        "/admin/models_app/llmmodel/", {"action": "enable", "_selected_action": [a.pk]}
    )
    assert list(LLMModel.objects.filter(enabled=True).values_list("name", flat=True)) == ["a"]
