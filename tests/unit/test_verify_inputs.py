"""verify's inputs: prompt files in their three shapes, the built-in set, corpus windows."""

from __future__ import annotations

import pytest

from server.verify.inputs import BUILTIN_PROMPTS, InputError, corpus_windows, load_prompts


def test_builtin_prompts():
    conversations = load_prompts(None, None)
    assert len(conversations) == len(BUILTIN_PROMPTS) == 32
    assert conversations[0] == [{"role": "user", "content": "Who are you?"}]
    assert len(load_prompts(None, 5)) == 5


def test_a_prompts_file_takes_plain_lines_message_lists_and_objects(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        "What is a CPU?",
        '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]',
        '{"messages": [{"role": "user", "content": "Bye"}]}',
        "",
    ]))
    assert load_prompts(path, None) == [
        [{"role": "user", "content": "What is a CPU?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Bye"}],
    ]


@pytest.mark.parametrize("line, message", [
    ("[not json", "prompts.jsonl:1: not valid JSON"),
    ('{"messages": []}', "expected a list of chat messages"),
    ('[{"content": "no role"}]', "expected a list of chat messages"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        load_prompts(path, None)


def test_an_empty_prompts_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompts(path, None)


def test_corpus_windows_split_like_llama_cpp():
    windows = corpus_windows(list(range(1000)), context=256, samples=None)
    assert len(windows) == 3  # the 232 tokens left over do not make a window
    context, scored = windows[1]
    assert context == list(range(256, 384)) and scored == list(range(384, 512))
    assert len(corpus_windows(list(range(1000)), 256, samples=2)) == 2
    with pytest.raises(InputError, match="fewer than one window"):
        corpus_windows(list(range(100)), 256, None)
