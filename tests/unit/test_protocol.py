"""Request validation rules that the handlers rely on."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields})


def test_stop_accepts_one_string_or_a_list():
    assert chat(stop="\n").stop == ["\n"]
    assert chat(stop=["a", "b"]).stop == ["a", "b"]
    assert chat().stop == []


@pytest.mark.parametrize(
    "fields",
    [
        {"n": True},
        {"temperature": "0.5"},
        {"stream": "yes"},
        {"logprobs": 1},
        {"tools": [{"type": "function"}]},
        {"echo": True},
        {"logit_bias": {"1": 5}},
        {"response_format": {"type": "json_object"}},
        {"best_of": 3},
        {"top_logprobs": 2},
    ],
)
def test_refused(fields):
    with pytest.raises(ValidationError):
        chat(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"response_format": {"type": "text"}}, {"best_of": 1}, {"tools": []}, {"echo": False}, {"unknown_field": 1}],
)
def test_harmless_defaults_and_unknown_fields_pass(fields):
    chat(**fields)


def test_text_parts_join_and_developer_role():
    request = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert request.messages[0].text() == "ab"


def test_logprobs_k():
    assert chat().logprobs_k is None
    assert chat(logprobs=True).logprobs_k == 0
    assert chat(logprobs=True, top_logprobs=4).logprobs_k == 4
    assert CompletionRequest(model="m", prompt="x", logprobs=2).logprobs_k == 2


def test_completion_limits():
    assert chat(max_tokens=5, max_completion_tokens=7).completion_limit == 7
    assert CompletionRequest(model="m", prompt="x").completion_limit == 16  # OpenAI's default
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": [1.5]})


@pytest.mark.parametrize(("fields", "named"), [
    ({"use_beam_search": True}, "use_beam_search"),
    ({"stop_token_ids": [2]}, "stop_token_ids"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"structured_outputs": {"json": {}}}, "structured_outputs"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"priority": 5}, "priority"),
    ({"length_penalty": True}, "length_penalty"),  # True == 1.0 in Python, not in JSON
    ({"priority": False}, "priority"),
    ({"include_reasoning": 1}, "include_reasoning"),
    ({"use_beam_search": 0}, "use_beam_search"),
])
def test_vllm_extensions_not_implemented_are_refused_by_name(fields, named):
    with pytest.raises(ValidationError, match=f"'{named}' \\(a vLLM extension\\) is not supported"):
        chat(**fields)


@pytest.mark.parametrize("fields", [
    {"use_beam_search": False}, {"stop_token_ids": []}, {"skip_special_tokens": True}, {"length_penalty": 1.0},
    {"structured_outputs": None}, {"priority": 0}, {"tool_choice": "none"}, {"add_generation_prompt": True},
    {"length_penalty": 1}, {"priority": 0.0},  # JSON has one number type
])
def test_vllm_extensions_at_their_off_value_pass(fields):
    chat(**fields)


def test_vllm_sampling_extensions_are_honoured_fields():
    request = chat(min_tokens=3, top_k=40, min_p=0.05, repetition_penalty=1.1, ignore_eos=True,
                   return_tokens_as_token_ids=True)
    assert (request.min_tokens, request.top_k, request.min_p, request.repetition_penalty) == (3, 40, 0.05, 1.1)
    assert chat(top_k=-1).top_k == -1 and chat(top_k=2.0).top_k == 2  # -1: vLLM's old "all"
    for bad in ({"top_k": -2}, {"min_p": 1.5}, {"repetition_penalty": 0}, {"repetition_penalty": 5e-324},
                {"min_tokens": -1}, {"min_tokens": 1.5},
                # past what the engine takes: vLLM's msgpack could not send 1788961433890813116416 (a fuzzer's 500)
                {"top_k": 1788961433890813116416}, {"top_k": 2**31}, {"min_tokens": 2**64}):
        with pytest.raises(ValidationError):
            chat(**bad)
    assert chat(top_k=2**31 - 1).top_k == 2**31 - 1  # as many as there are tokens, and more: all of them
