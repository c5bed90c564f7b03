"""Build the shadow path from settings: the scorer (local or remote) with its vocabulary
check, the noise floor in the candidate's serving dtype, metrics on the caller's
registry, and the optional capture."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from shadow.calibration import Calibration
from shadow.capture import DivergenceCapture
from shadow.metrics import CANDIDATE, NOISE_FLOOR, ShadowMetrics
from shadow.path import ShadowPath
from shadow.reference_check import ReferenceCheck
from shadow.scoring import Scorer, check_same_vocab, vocab_fingerprint
from shadow.settings import ShadowSettings


def load_reference(
    settings: ShadowSettings, candidate_dir: Path, candidate_tokenizer, *, trust_remote_code: bool = False,
    defer_unreachable: bool = False,
) -> Scorer:
    """Blocking (loads or connects to the reference). Raises ShadowReferenceError when it
    cannot be used, e.g. when it does not share the candidate's vocabulary, and
    RemoteCodeError when its own code is refused or fails to load.

    `defer_unreachable` (the server): a remote reference that cannot be reached is not an
    error; the scorer starts pending, and `build_shadow_path` has it watched in the
    background, with the same checks once it answers."""
    candidate_vocab = vocab_fingerprint(candidate_tokenizer)
    if settings.shadow_reference_url:
        from shadow.remote_scorer import ReferenceUnavailableError, RemoteScorer

        url = settings.shadow_reference_url
        token = settings.shadow_reference_token.get_secret_value() if settings.shadow_reference_token else None
        try:
            scorer = RemoteScorer.connect(url, token, settings.shadow_timeout_s)
        except ReferenceUnavailableError:
            if not defer_unreachable:
                raise
            return RemoteScorer.pending(url, token, settings.shadow_timeout_s, settings.shadow_reference_name)
    else:
        from shadow.local_scorer import LocalScorer
        from shadow.placement import parse_max_memory

        memory = settings.shadow_reference_max_memory
        scorer = LocalScorer.load(
            settings.shadow_reference_model or candidate_dir,
            settings.shadow_reference_adapter,
            settings.shadow_reference_device,
            trust_remote_code=trust_remote_code,  # one flag for candidate and reference
            max_memory=parse_max_memory(memory) if memory else None,
        )
        # In the server's process: its forwards must leave the host to the client's requests.
        scorer.confine(settings.shadow_reference_threads, settings.shadow_reference_nice)
    check_same_vocab(candidate_vocab, scorer.vocab, scorer.name)
    return scorer


def build_shadow_path(
    settings: ShadowSettings,
    scorer: Scorer,
    *,
    model_name: str,
    serving_dtype: str,
    candidate_tokenizer,
    registry: CollectorRegistry,
    self_check: Callable[[], Awaitable[ReferenceCheck]] | None = None,
    calibration: Calibration | None = None,
    engine_load: Callable[[], int] | None = None,
) -> ShadowPath:
    """Blocking (builds the serving-dtype copy of a local reference). `serving_dtype` is
    the dtype the engine really runs in (vLLM's `auto` resolves it at load). `self_check`:
    the reference's self-check, run before anything is judged (server/serving/reference_probe.py).
    `engine_load`: the serving engine's requests in hand; the reference runs free at 0."""
    comparisons = (CANDIDATE,)
    if settings.shadow_noise_floor:
        scorer.enable_noise_floor(serving_dtype)
        comparisons = (CANDIDATE, NOISE_FLOOR)
    if scorer.state is not None:  # a remote reference: watched, and checked whenever it answers anew
        candidate_vocab = vocab_fingerprint(candidate_tokenizer)
        scorer.monitor(lambda vocab, name: check_same_vocab(candidate_vocab, vocab, name))
    reference = settings.shadow_reference_name or scorer.name
    metrics = ShadowMetrics(registry, model_name, reference, settings.shadow_labels, comparisons)
    capture = None
    if settings.shadow_capture_path is not None:
        decode = (lambda ids: candidate_tokenizer.decode(ids)) if settings.shadow_capture_content else None
        capture = DivergenceCapture(
            settings.shadow_capture_path,
            int(settings.shadow_capture_max_mb * 2**20),
            settings.shadow_capture_backups,
            decode,
        )
    return ShadowPath(settings, scorer, metrics, capture, model_name=model_name, reference_name=reference,
                      self_check=self_check, calibration=calibration, engine_load=engine_load)
