"""The official `openai` client against a live server on the real vLLM engine (SmolLM2)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(vllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=vllm_server.api_key, max_retries=0)


def chat_prompt_len(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_answer_with_usage_and_logprobs(client, tokenizer):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    tokens = choice.logprobs.content
    assert reply.usage.prompt_tokens == chat_prompt_len(tokenizer, MESSAGES)
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The emitted text is the concatenation of the tokens, and at temperature 0 each token
    # is the most likely one: its log-prob is the top alternative's.
    assert "".join(t.token for t in tokens).strip() == choice.message.content.strip()
    for t in tokens:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)


def test_logprobs_absent_unless_asked(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].logprobs is None


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_choices_are_seeded_like_single_requests(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0)
    reply = client.chat.completions.create(**kwargs, n=2, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    singles = [client.chat.completions.create(**kwargs, seed=7 + i) for i in range(2)]
    assert [c.message.content for c in reply.choices] == [r.choices[0].message.content for r in singles]
    assert reply.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_stop_string_stops_before_it(client):
    base = client.completions.create(model=MODEL_NAME, prompt="One, two, three, four,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "," in text, text  # the model continues the list
    stopped = client.completions.create(model=MODEL_NAME, prompt="One, two, three, four,", max_tokens=12, temperature=0, stop=[","])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(",")]


def test_small_max_tokens_finishes_with_length(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_completion_with_logprobs_and_usage(client, tokenizer):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == len(choice.logprobs.tokens) == 6
    assert "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)


def test_completion_stream_and_token_id_prompt(client, tokenizer):
    ids = tokenizer.encode("The capital of France is")
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    stream = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_ids.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_completion_batch_of_prompts_is_prompt_major(client):
    reply = client.completions.create(model=MODEL_NAME, prompt=["Hello", "Goodbye"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    single = client.completions.create(model=MODEL_NAME, prompt="Goodbye", max_tokens=3, temperature=0)
    assert reply.choices[2].text == reply.choices[3].text == single.choices[0].text


def test_ignore_eos_runs_to_max_tokens(client):
    """vLLM's extension (its benchmark client sends it), through the official client's
    extra_body: a greedy answer that ends early ends at max_tokens instead."""
    messages = [{"role": "user", "content": "Say only the word yes."}]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=48, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 48
    forced = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=48, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 48


def test_vllm_extensions_through_extra_body(client, tokenizer):
    """vLLM's fields, sent as its users send them (openai's `extra_body`), are honoured."""
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"min_tokens": 6, "top_k": 5, "repetition_penalty": 1.2, "return_tokens_as_token_ids": True},
    )
    tokens = reply.choices[0].logprobs.content
    assert reply.usage.completion_tokens == 6 and len(tokens) == 6
    ids = [int(t.token.removeprefix("token_id:")) for t in tokens]
    assert all(t.token.startswith("token_id:") for t in tokens)
    assert tokenizer.decode(ids) == reply.choices[0].message.content


def test_tokenize_and_detokenize_routes(client, vllm_server, tokenizer):
    """vLLM's /tokenize and /detokenize, against the tokenizer and chat template applied here."""
    import httpx

    post = lambda path, body: httpx.post(vllm_server.url + path, json=body, headers=vllm_server.headers,  # noqa: E731
                                         timeout=30)
    text = "Grüße, 世界! Hello world."
    reply = post("/tokenize", {"model": MODEL_NAME, "prompt": text, "return_token_strs": True}).json()
    assert reply["tokens"] == tokenizer.encode(text) and reply["count"] == len(reply["tokens"])
    assert reply["token_strs"] == tokenizer.convert_ids_to_tokens(reply["tokens"]) and reply["max_model_len"] == 2048
    chat = post("/tokenize", {"messages": MESSAGES}).json()
    assert chat["count"] == chat_prompt_len(tokenizer, MESSAGES)
    # The count is what the completion route bills as prompt tokens.
    billed = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == billed
    assert post("/detokenize", {"tokens": reply["tokens"]}).json() == {"prompt": text}
