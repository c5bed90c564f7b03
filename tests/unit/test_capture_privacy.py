"""Divergence capture privacy: token ids decode back to the user's text, so without
`--shadow-capture-content` a record holds statistics only (no id, no text); the files
(rotated ones too) are owner-only."""

from __future__ import annotations

import asyncio
import json
import os
import random
import stat

from prometheus_client import CollectorRegistry

from shadow.capture import DivergenceCapture
from shadow.factory import build_shadow_path
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.settings import ShadowSettings
from tests.scorers import LP, EchoScorer

PROMPT = [5, 6, 7]
ID_FIELDS = {"prompt_ids", "output_ids", "prompt_text", "output_text"}
POSITION_ID_FIELDS = {"token", "candidate_top1", "reference_top1", "reference_top"}


def sample(request_id: str = "r") -> ShadowSample:
    return ShadowSample(request_id, "cand", [ShadowSequence(list(PROMPT), [1] * 4, [dict(LP)] * 4)])


def capture_records(capture: DivergenceCapture, n: int = 1) -> None:
    settings = ShadowSettings(shadow_rate=1.0, shadow_timeout_s=5.0)
    scorer = EchoScorer(flip_at=2)
    path = ShadowPath(settings, scorer, ShadowMetrics(CollectorRegistry(), "cand", scorer.name), capture, rng=random.Random(0))

    async def run():
        path.start()
        for i in range(n):
            path.submit(sample(f"req-{i}"))
        await path.stop()

    asyncio.run(run())


def read(directory) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.iterdir()) for line in f.read_text().splitlines()]


def test_default_capture_holds_no_ids_and_no_text(tmp_path):
    capture_records(DivergenceCapture(tmp_path / "div.jsonl", 10**6, 1))
    (record,) = read(tmp_path)
    assert not ID_FIELDS & record.keys()
    assert record["result"] == "hard" and record["first_divergence"] == 2
    assert record["prompt_tokens"] == 3 and record["output_tokens"] == 4
    for position in record["positions"]:
        assert not POSITION_ID_FIELDS & position.keys()
        assert {"kl", "delta_p", "drift", "candidate_logprob", "reference_logprob", "reference_top_logprobs",
                "top1_agree"} <= position.keys()
    assert [p["top1_agree"] for p in record["positions"]] == [True, True, False, True]
    # No token id anywhere in the line: the candidate's/reference's ids here are 1 and 2,
    # the prompt's 5, 6, 7; the only lists are log-prob lists (floats).
    assert all(isinstance(v, float) for p in record["positions"] for v in p["reference_top_logprobs"])


def test_content_capture_holds_ids_and_text(tmp_path):
    capture_records(DivergenceCapture(tmp_path / "div.jsonl", 10**6, 1, decode=lambda ids: " ".join(map(str, ids))))
    (record,) = read(tmp_path)
    assert record["prompt_ids"] == PROMPT and record["output_ids"] == [1, 1, 1, 1]
    assert record["prompt_text"] == "5 6 7" and record["output_text"] == "1 1 1 1"
    flipped = record["positions"][2]
    assert flipped["token"] == 1 and flipped["candidate_top1"] == 1 and flipped["reference_top1"] == 2
    assert set(flipped["reference_top"]) == {"1", "2"} and flipped["kl"] > 0


def test_capture_files_are_owner_only_also_after_rotation(tmp_path):
    old = os.umask(0)  # the mode must not rely on the process umask
    try:
        capture = DivergenceCapture(tmp_path / "div.jsonl", max_bytes=1500, backups=2)
        assert stat.S_IMODE((tmp_path / "div.jsonl").stat().st_mode) == 0o600  # before any record
        capture_records(capture, n=12)
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["div.jsonl", "div.jsonl.1", "div.jsonl.2"]  # rotated
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}


def test_existing_capture_file_is_narrowed_to_owner_only(tmp_path):
    file = tmp_path / "div.jsonl"
    file.write_text("")
    file.chmod(0o644)
    DivergenceCapture(file, 10**6, 1).close()
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_factory_decodes_only_with_the_content_opt_in(tmp_path):
    class Tokenizer:
        def decode(self, ids):
            return "text"

    def capture_of(**flags):
        settings = ShadowSettings(shadow_rate=1.0, shadow_noise_floor=False, shadow_capture_path=tmp_path / "c.jsonl", **flags)
        path = build_shadow_path(settings, EchoScorer(), model_name="cand", serving_dtype="float32",
                                 candidate_tokenizer=Tokenizer(), registry=CollectorRegistry())
        path.capture.close()
        return path.capture

    assert ShadowSettings().shadow_capture_content is False
    assert not capture_of().content
    assert capture_of(shadow_capture_content=True).content
    # The old name still opts in (deprecated).
    assert ShadowSettings(shadow_capture_text=True).shadow_capture_content is True
    assert capture_of(shadow_capture_text=True).content
