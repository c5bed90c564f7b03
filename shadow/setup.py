"""Build the shadow path from settings: the scorer (local or remote), the vocabulary
check, metrics on the caller's registry, and the optional capture."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from shadow.capture import DivergenceCapture
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.scoring import Scorer, check_same_vocab, vocab_fingerprint
from shadow.settings import ShadowSettings


def load_scorer(settings: ShadowSettings, candidate_dir: Path) -> Scorer:
    if settings.shadow_reference_url:
        from shadow.remote_scorer import RemoteScorer

        token = settings.shadow_reference_token.get_secret_value() if settings.shadow_reference_token else None
        return RemoteScorer.connect(settings.shadow_reference_url, token, settings.shadow_timeout_s)
    from shadow.local_scorer import LocalScorer

    return LocalScorer.load(
        settings.shadow_reference_model or candidate_dir,
        settings.shadow_reference_adapter,
        settings.shadow_reference_device,
    )


def build_shadow_path(
    settings: ShadowSettings,
    *,
    candidate_dir: Path,
    model_name: str,
    candidate_tokenizer,
    registry: CollectorRegistry,
) -> ShadowPath:
    """Blocking (loads the reference). Raises ReferenceError when it cannot be used."""
    scorer = load_scorer(settings, candidate_dir)
    check_same_vocab(vocab_fingerprint(candidate_tokenizer), scorer.vocab, scorer.name)
    metrics = ShadowMetrics(registry, model_name, settings.shadow_reference_name or scorer.name, settings.shadow_labels)
    capture = None
    if settings.shadow_capture_path is not None:
        decode = (lambda ids: candidate_tokenizer.decode(ids)) if settings.shadow_capture_text else None
        capture = DivergenceCapture(
            settings.shadow_capture_path,
            int(settings.shadow_capture_max_mb * 2**20),
            settings.shadow_capture_backups,
            decode,
        )
    return ShadowPath(settings, scorer, metrics, capture)
