"""verify's text report, laid out like llama.cpp's `--kl-divergence` summary, with the
noise floor in a column beside the candidate, then the verdict and its reasons."""

from __future__ import annotations

from shadow.report import ShadowReport, SideReport, TrajectoryPoint

KL_ROWS = ("100", "99.9", "99", "90", "50", "10", "5", "1", "0")
DP_ROWS = ("100", "99.9", "99", "95", "90", "75", "50", "25", "10", "5", "1", "0.1", "0")
_LABEL = {"100": "Maximum", "0": "Minimum", "50": "Median"}

Row = tuple[str, str, str]  # label, candidate, noise floor ("" label: a blank separator)


def summary_rows(report: ShadowReport) -> list[Row]:
    """The statistics table, shared by the text and the HTML report."""
    c, n = report.candidate, report.noise_floor
    rows: list[Row] = []

    def row(label: str, fn) -> None:
        rows.append((label, fn(c), fn(n) if n is not None else "-"))

    # KL in scientific notation: fp16 noise (~1e-5) and fp32 (~1e-10) vanish at 6 decimals.
    row("Mean    KLD", lambda s: f"{s.kl.mean:.3e} ± {s.kl.stderr:.1e}")
    for p in KL_ROWS:
        row(f"{_LABEL.get(p, p + '%'):7} KLD", lambda s, p=p: f"{s.kl.percentiles[p]:.3e}")
    row("Mean    Δp", lambda s: f"{100 * s.delta_p.mean:.3f} ± {100 * s.delta_p.stderr:.3f} %")
    for p in DP_ROWS:
        row(f"{_LABEL.get(p, p + '%'):7} Δp", lambda s, p=p: f"{100 * s.delta_p.percentiles[p]:.3f} %")
    row("RMS Δp", lambda s: f"{100 * s.delta_p.rms:.3f} %")
    row("Same top p", lambda s: f"{100 * s.same_top1.value:.3f} ± {100 * s.same_top1.stderr:.3f} %")
    row("Mean drift (nats)", lambda s: f"{s.drift.mean:.4f}")
    rows.append(("", "", ""))
    row("identical/near_tie/hard", lambda s: f"{s.identical}/{s.near_tie}/{s.hard}")
    row("first divergence, median", lambda s: "-" if s.first_divergence_median is None else f"{s.first_divergence_median:g}")
    for k in ("8", "16", "32", "64"):
        row(f"P(diverged by {k})", lambda s, k=k: f"{s.diverged_by[k]:.2f}")
    row("widest flip margin", _margin)
    return rows


def intro(report: ShadowReport) -> str:
    c = report.candidate
    check = report.reference_check
    trusted = "" if check is None else f"; reference self-check {'passed' if check.trusted else 'FAILED'}: {check.summary()}"
    return (f"{c.sequences} sequences, {c.tokens} tokens compared; noise floor: the reference in "
            f"{report.noise_dtype or '(off)'} vs itself in fp32, over the same positions{trusted}")


def header(settings, report: ShadowReport) -> str:
    """One line naming what was compared (`settings`: the run's VerifySettings)."""
    mode = (f"corpus {settings.corpus}, windows of {settings.context} tokens (second half scored)"
            if settings.corpus else f"{settings.max_tokens} greedy tokens per prompt")
    mounted = getattr(settings, "candidate_adapter", None)
    reference_adapter = settings.adapter or mounted
    adapter = f" + adapter {reference_adapter} unmerged" if reference_adapter else ""
    candidate = f"{settings.candidate} + adapter {mounted} mounted" if mounted else f"{settings.candidate}"
    return (f"shadowserve verify: {candidate} ({settings.engine}, {report.noise_dtype or settings.dtype}) "
            f"vs {settings.reference}{adapter} (fp32); {mode}")


def render_text(report: ShadowReport, title: str, sequences: list[Row] = (), structure: list[str] = ()) -> str:
    """`structure`: the config and weight passes' lines, printed under the verdict."""
    lines = [title, ""]
    tail = [*verdict_lines(report), *([""] + list(structure) if structure else [])]
    if report.candidate is None:
        return "\n".join([*lines, "nothing was compared", "", *tail])
    lines += [intro(report), "", f"{'':26}{'candidate':>24}{'noise floor':>24}"]
    lines += [f"{label:26}{cand:>24}{noise:>24}" if label else "" for label, cand, noise in summary_rows(report)]
    if sequences:
        lines += ["", "First divergence per sequence (position: kind, reference margin, the two top-1 tokens)", ""]
        lines += [f"{label[:34]:36}{cand:54}  {noise}" for label, cand, noise in [("", "candidate", "noise floor"), *sequences]]
    return "\n".join([*lines, "", *tail])


def sequence_rows(sequences, labels: dict[str, str], decode) -> list[Row]:
    """One row per sequence, in input order: where each side first left the reference's
    top-1, how wide the reference's margin was there, and which tokens competed."""
    order = {request_id: n for n, request_id in enumerate(labels)}

    def first(c) -> str:
        if c is None:
            return "-"
        if c.first_divergence is None:
            return f"identical over {c.compared_tokens}"
        mine, theirs = (repr(decode([t])) for t in c.diverged)
        return f"@{c.first_divergence}: {c.result}, {c.margin:.3f} nats, {mine} vs {theirs}"

    rows = sorted(sequences, key=lambda s: order.get(s.request_id, len(order)))
    return [(labels.get(s.request_id, s.request_id), first(s.candidate), first(s.noise)) for s in rows]


def _margin(side: SideReport) -> str:
    return "-" if side.max_flip_margin is None else f"{side.max_flip_margin:.3f} nats"


def difference_label(verdict) -> str:
    """The converter's answer, beside the tolerance verdict."""
    return {True: "YES", False: "not detected", None: "undecided"}[verdict.different]


def verdict_lines(report: ShadowReport) -> list[str]:
    v = report.verdict
    lines = [f"Verdict: {v.status.upper()}    Detectably different from the noise floor: {difference_label(v)}"]
    lines += [f"  - {reason}" for reason in v.reasons]
    if report.trajectory:
        lines.append(f"  {describe_trajectory(report.trajectory)}")
    return lines


def describe_trajectory(points: list[TrajectoryPoint]) -> str:
    """When the verdict first left `inconclusive`, and whether it later changed."""
    decided = next((p for p in points if p.status != "inconclusive"), None)
    if decided is None:
        return f"still inconclusive after {len(points)} sequences"
    later = {p.status for p in points if p.sequences >= decided.sequences}
    steady = "and held it to the end" if later == {decided.status} else f"then read {'/'.join(sorted(later))}"
    return f"first decided '{decided.status}' after {decided.sequences} of {points[-1].sequences} sequences, {steady}"
