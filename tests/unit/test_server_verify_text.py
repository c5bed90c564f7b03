"""verify's text report (server/verify/text.py) on reports built from synthetic compared
sequences (tests/verdict_streams.py): the llama.cpp-style table with the noise floor beside
the candidate, the verdict with its reasons and trajectory, the per-sequence rows in input
order, and the header naming what was compared. The HTML page shares these tables."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from server.verify.text import describe_trajectory, difference_label, header, render_text, sequence_rows, summary_rows
from shadow.report import TrajectoryPoint, build_report
from shadow.verdict import VerdictPolicy
from tests.verdict_streams import TOKENS, comparison, records


def report(recs, noise_dtype: str | None = "bfloat16"):
    return build_report(recs, model="candidate", reference="reference", noise_dtype=noise_dtype, policy=VerdictPolicy(),
                        with_trajectory=True)


def test_the_table_puts_the_noise_floor_beside_the_candidate():
    bad = report(records(32, scale=5.0))
    text = render_text(bad, "shadowserve verify: a vs b").splitlines()
    assert text[0] == "shadowserve verify: a vs b"
    assert text[2].startswith(f"32 sequences, {32 * TOKENS} tokens compared; noise floor: the reference in bfloat16")
    (mean,) = [line for line in text if line.startswith("Mean    KLD")]
    assert mean == f"{'Mean    KLD':26}{f'{bad.candidate.kl.mean:.3e} ± {bad.candidate.kl.stderr:.1e}':>24}" \
                   f"{f'{bad.noise_floor.kl.mean:.3e} ± {bad.noise_floor.kl.stderr:.1e}':>24}"
    rows = summary_rows(bad)
    table = [line for line in text if line[:26].strip() in {label for label, _, _ in rows if label}]
    assert len(table) == sum(1 for label, _, _ in rows if label) and {len(line) for line in table} == {26 + 24 + 24}
    assert ("identical/near_tie/hard", "16/16/0", "32/0/0") in rows
    verdict = text.index("Verdict: FAIL    Detectably different from the noise floor: YES")
    assert text[verdict + 1].startswith("  - above the limit: mean token KL is")
    assert text[-1] == "  first decided 'fail' after 8 of 32 sequences, and held it to the end"


def test_without_a_noise_floor_its_column_is_a_dash():
    rows = summary_rows(report([replace(r, noise=None) for r in records(16, scale=1.0)], noise_dtype=None))
    assert rows and all(noise in ("-", "") for _, _, noise in rows)


def test_nothing_compared_says_so_above_the_verdict():
    text = render_text(report([]), "title", structure=["config: same"])
    assert text.splitlines() == ["title", "", "nothing was compared", "",
                                 "Verdict: INCONCLUSIVE    Detectably different from the noise floor: undecided",
                                 "  - 0 sequences / 0 tokens compared; a verdict needs at least 8 sequences and 32 tokens",
                                 "", "config: same"]


def test_the_trajectory_says_when_the_verdict_was_first_taken_and_if_it_moved():
    def points(*statuses: str) -> list[TrajectoryPoint]:
        return [TrajectoryPoint(sequences=n + 1, status=s) for n, s in enumerate(statuses)]

    assert describe_trajectory(points("inconclusive", "inconclusive")) == "still inconclusive after 2 sequences"
    assert describe_trajectory(points("inconclusive", "pass", "pass")) == \
        "first decided 'pass' after 2 of 3 sequences, and held it to the end"
    assert describe_trajectory(points("pass", "inconclusive", "pass")) == \
        "first decided 'pass' after 1 of 3 sequences, then read inconclusive/pass"
    labels = [difference_label(SimpleNamespace(different=d)) for d in (True, False, None)]
    assert labels == ["YES", "not detected", "undecided"]


def test_sequence_rows_follow_the_input_order_and_name_the_competing_tokens():
    same = np.ones(4, dtype=bool)
    flipped = np.array([True, False, True, True])
    identical = comparison(np.zeros(4), np.zeros(4), same, None, "identical")
    diverged = replace(comparison(np.full(4, 0.1), np.zeros(4), flipped, 1, "near_tie", 0.042), diverged=(7, 9))
    first, second = records(2, scale=1.0)
    sequences = [replace(second, request_id="b", candidate=diverged, noise=None),
                 replace(first, request_id="a", candidate=identical, noise=identical)]
    rows = sequence_rows(sequences, {"a": "prompt 1", "b": "prompt 2"}, lambda ids: f"<{ids[0]}>")
    assert rows == [("prompt 1", "identical over 4", "identical over 4"),
                    ("prompt 2", "@1: near_tie, 0.042 nats, '<7>' vs '<9>'", "-")]


def test_the_header_names_both_sides_and_the_mode():
    done = report(records(16, scale=1.0))
    prompts = SimpleNamespace(corpus=None, max_tokens=64, adapter=None, candidate="cand", engine="vllm", dtype="bfloat16",
                              reference="ref")
    assert header(prompts, done) == \
        "shadowserve verify: cand (vllm, bfloat16) vs ref (fp32); 64 greedy tokens per prompt"
    corpus = SimpleNamespace(**{**vars(prompts), "corpus": "wiki.txt", "context": 128, "candidate_adapter": "tenant-a",
                                "adapter": None})
    assert header(corpus, report([], noise_dtype=None)) == (
        "shadowserve verify: cand + adapter tenant-a mounted (vllm, bfloat16) vs ref + adapter tenant-a unmerged (fp32); "
        "corpus wiki.txt, windows of 128 tokens (second half scored)")
