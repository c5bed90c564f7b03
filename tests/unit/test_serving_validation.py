"""server/serving/validation.py: every request limit, each refusal a 400 (413 for the
reference's caps) in OpenAI's shape with its `param`, naming the flag to change and both
numbers; and what is within the limits passes. plan_jobs applying the validator is here too."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from server.body_limit import BodySizeLimit
from server.engines import SamplingOptions
from server.errors import APIError, ContextLengthError
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.reference_app import ReferenceSettings
from server.serving.generation import Job, plan_jobs
from server.serving.validation import RequestValidator, ScoringValidator
from server.settings import ServeSettings
from shadow.scoring import ScoreItem

V = RequestValidator(max_message_chars=10, max_prompts=3, max_stop_chars=4, max_request_tokens=64, max_n=4,
                     max_logprobs=5, max_request_bytes=2048)


def chat(*contents: str, **fields) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": c} for c in contents or ("hi",)]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})


def completion(prompt="hi", **fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": prompt, **fields})


def refused(check: Callable[[], object], param: str, *named: str, status: int = 400) -> APIError:
    """The check refuses with this status and param, its message naming each of `named`
    (the flag, the numbers), in OpenAI's error shape."""
    with pytest.raises(APIError) as caught:
        check()
    error = caught.value
    assert error.status_code == status and error.param == param, (error.status_code, error.param, str(error))
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    for name in named:
        assert name in body["message"], (name, body["message"])
    return error


def test_from_settings_holds_every_limit(demo_model):
    settings = ServeSettings(model=demo_model, engine="transformers", max_message_chars=11, max_prompts=2, max_stop_chars=3,
                             max_request_tokens=99, max_n=5, max_logprobs=7, max_request_bytes=4096)
    assert RequestValidator.from_settings(settings) == RequestValidator(
        max_message_chars=11, max_prompts=2, max_stop_chars=3, max_request_tokens=99, max_n=5, max_logprobs=7,
        max_request_bytes=4096)
    defaults = ServeSettings(model=demo_model, engine="transformers")
    assert RequestValidator.from_settings(defaults) == RequestValidator()  # the settings' defaults are its own


# --- chat and completions: before anything costs ---------------------------------------


def test_within_every_limit_passes():
    V.check_request(chat("x" * 10, stop=["abcd"]))
    V.check_request(completion(["a" * 10, "b", "c"], stop="abcd"))
    V.check_request(completion([1] * 500))  # token ids are one prompt, and no characters
    V.check_choices(chat(n=4, logprobs=True, top_logprobs=5))
    V.check_choices(completion(logprobs=5))
    V.check_prompt_logprobs(completion(prompt_logprobs=5, echo=True, logprobs=5, max_tokens=0))


def test_message_characters():
    refused(lambda: V.check_request(chat("ok", "x" * 11)), "messages.1.content", "11 characters", "10",
            "(--max-message-chars)")
    parts = [{"type": "text", "text": "x" * 6}, {"type": "text", "text": "y" * 6}]
    refused(lambda: V.check_request(chat(*[""], messages=[{"role": "user", "content": parts}])), "messages.0.content",
            "--max-message-chars")


def test_prompt_characters_and_batch():
    refused(lambda: V.check_request(completion("x" * 11)), "prompt", "11 characters", "--max-message-chars")
    refused(lambda: V.check_request(completion(["ok", "x" * 11])), "prompt.1", "--max-message-chars")
    refused(lambda: V.check_request(completion(["a", "b", "c", "d"])), "prompt", "4 prompts", "the limit is 3",
            "(--max-prompts)")
    refused(lambda: V.check_request(completion([[1], [2], [3], [4]])), "prompt", "--max-prompts")


def test_stop_characters():
    refused(lambda: V.check_request(chat(stop=["ok", "abcde"])), "stop", "stop.1", "5 characters", "the limit is 4",
            "(--max-stop-chars)")
    refused(lambda: V.check_request(completion(stop="abcde")), "stop", "--max-stop-chars")


def test_lone_surrogates_are_refused_naming_the_field():
    error = refused(lambda: V.check_request(chat("a\ud800b")), "messages.0.content", "character 1", "U+D800")
    assert "surrogate" in str(error)
    refused(lambda: V.check_request(completion("ok", stop=["\udfff"])), "stop.0", "U+DFFF")
    V.check_request(chat("\U0001f600"))  # a pair is one character: fine


def test_n_and_logprobs_name_their_flags():
    refused(lambda: V.check_choices(chat(n=9)), "n", "n: 9 choices; the limit is 4 (--max-n)")
    refused(lambda: V.check_choices(chat(logprobs=True, top_logprobs=6)), "top_logprobs",
            "top_logprobs: 6 log-probs per token; the limit is 5 (--max-logprobs)")
    refused(lambda: V.check_choices(completion(logprobs=6)), "logprobs", "logprobs: 6", "(--max-logprobs)")


def test_prompt_logprobs_name_their_flag():
    refused(lambda: V.check_prompt_logprobs(completion(prompt_logprobs=6, max_tokens=0)), "prompt_logprobs",
            "prompt_logprobs: 6 log-probs per prompt token; the limit is 5 (--max-logprobs)")
    refused(lambda: V.check_prompt_logprobs(completion(echo=True, logprobs=6)), "logprobs", "(--max-logprobs)")


# --- the context and the request's token budget -----------------------------------------


def test_the_budget_defaults_to_the_rest_of_the_context():
    assert V.completion_budget(30, None, 100, "messages") == 70
    assert V.completion_budget(30, 70, 100, "messages") == 70


@pytest.mark.parametrize("prompt_len, asked, param", [(100, None, "prompt"), (150, 1, "prompt"), (90, 11, "max_tokens")])
def test_past_the_context_is_openais_context_length_error(prompt_len, asked, param):
    error = refused(lambda: V.completion_budget(prompt_len, asked, 100, "prompt"), param,
                    "This model's maximum context length is 100 tokens (--max-model-len).")
    assert isinstance(error, ContextLengthError) and error.body()["error"]["code"] == "context_length_exceeded"


def jobs(*max_tokens: int) -> list[Job]:
    return [Job(i, [1], SamplingOptions(max_tokens=m)) for i, m in enumerate(max_tokens)]


def test_the_request_token_budget():
    assert V.fit_budget(jobs(32, 32), explicit=True, n=2, prompts=1) == jobs(32, 32)
    refused(lambda: V.fit_budget(jobs(33, 32), explicit=True, n=2, prompts=1), "max_tokens",
            "may generate 65 tokens (1 prompt(s) x n=2 x max_tokens)", "the limit is 64 (--max-request-tokens)")
    # No max_tokens sent: the context's room is shared out, not refused.
    shared = V.fit_budget(jobs(90, 90, 10), explicit=False, n=3, prompts=1)
    assert [j.options.max_tokens for j in shared] == [21, 21, 10]


def test_plan_jobs_applies_the_validator():
    engine = SimpleNamespace(max_model_len=100)
    refused(lambda: plan_jobs(chat(n=5), [[1]], engine, validator=V), "n", "(--max-n)")
    refused(lambda: plan_jobs(chat(logprobs=True, top_logprobs=6), [[1]], engine, validator=V), "top_logprobs",
            "(--max-logprobs)")
    refused(lambda: plan_jobs(chat(max_tokens=11), [[1] * 90], engine, validator=V), "max_tokens", "(--max-model-len)")
    refused(lambda: plan_jobs(completion(), [[1] * 100], engine, validator=V), "prompt", "(--max-model-len)")
    refused(lambda: plan_jobs(chat(), [[1] * 150], engine, validator=V), "messages", "(--max-model-len)")
    assert [j.options.max_tokens for j in plan_jobs(chat(n=2), [[1] * 30], engine, validator=V)] == [70, 70]


# --- /tokenize, /detokenize, the body -----------------------------------------------------


def test_tokenize_has_the_character_limit():
    V.check_tokenize(TokenizeRequest(prompt="x" * 10))
    refused(lambda: V.check_tokenize(TokenizeRequest(prompt="x" * 11)), "prompt", "(--max-message-chars)")
    request = TokenizeRequest.model_validate({"messages": [{"role": "user", "content": "x" * 11}]})
    refused(lambda: V.check_tokenize(request), "messages.0.content", "(--max-message-chars)")


def test_detokenize_is_capped_by_the_context():
    V.check_detokenize(DetokenizeRequest(tokens=[1] * 64), 64)
    refused(lambda: V.check_detokenize(DetokenizeRequest(tokens=[1] * 65), 64), "tokens",
            "tokens: 65 ids; the limit is the model's context, 64 tokens (--max-model-len)")


def test_the_body_limit_is_the_validators():
    """The middleware refuses past `max_request_bytes` (server/body_limit.py; tested in
    tests/unit/test_server_body_limit.py), naming the flag."""
    limit = BodySizeLimit(app=None, max_bytes=V.max_request_bytes)
    assert limit.message(4096) == "request body of 4096 bytes; the limit is 2048 bytes (--max-request-bytes)"


# --- `shadowserve reference`'s score requests ----------------------------------------------


S = ScoringValidator(max_item_tokens=8, max_request_tokens=20, max_body_bytes=1000)


def item(prompt: int, output: int, token: int = 1) -> ScoreItem:
    return ScoreItem([token] * prompt, [2] * output, [[1, 2]] * output)


def test_the_reference_limits_from_its_settings():
    settings = ReferenceSettings(model="/m", max_item_tokens=10, max_request_tokens=20, max_body_bytes=3000)
    assert ScoringValidator.from_settings(settings) == ScoringValidator(10, 20, 3000)
    assert ScoringValidator.from_settings(ReferenceSettings(model="/m")) == ScoringValidator()


def test_score_items_within_the_caps_pass():
    S.check_items([item(4, 4), item(1, 1)], vocab_size=10)


def test_score_items_past_the_caps_are_413_naming_the_flag():
    refused(lambda: S.check_items([item(2, 2), item(5, 4)], 10), "items.1", "9 prompt + output tokens",
            "--max-item-tokens 8", status=413)
    refused(lambda: S.check_items([item(4, 4)] * 3, 10), "items", "24 tokens", "--max-request-tokens 20", status=413)
    # Padded to the longest item (8): 4 x 8 = 32, though only 14 tokens are sent.
    refused(lambda: S.check_items([item(1, 7), item(1, 1), item(1, 1), item(1, 1)], 10), "items", "padded", "32",
            status=413)


def test_score_ids_outside_the_vocabulary_are_400():
    refused(lambda: S.check_items([item(1, 1), item(2, 2, token=10)], 10), "items.1", "outside the vocabulary")
