"""Client of a remote reference (`shadowserve reference`): the same statistics as the
local scorer, computed on the reference's own deployment (its own GPUs, its own
autoscaler).

A reference unreachable when the server starts does not stop it (`load_reference` with
`defer_unreachable`): the scorer starts `unreachable`, sampled requests count as `error`
outcomes, and a background thread retries GET /v1/shadow/info with capped exponential
backoff. When the reference answers it runs the same checks as at start (vocabulary,
noise-floor dtype): they pass → `up`; they fail → `disabled`, logged at ERROR, and the
shadow path keeps counting its samples as errors rather than compare garbage."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from shadow.scoring import (
    SCORE_PATH,
    ReferenceInfo,
    ScoredSequence,
    ScoreItem,
    ScoreItemBody,
    ScoreRequestBody,
    ScoreResponseBody,
    ShadowReferenceError,
    VocabInfo,
    from_body,
)

UNREACHABLE_STATUSES = (502, 503, 504)  # a proxy in front of a reference that is not up (yet)
UNREACHABLE, UP, DISABLED = "unreachable", "up", "disabled"

log = logging.getLogger(__name__)


class ReferenceUnavailableError(ShadowReferenceError):
    """The remote reference cannot be reached (refused, timed out, 502-504)."""


def fetch_info(url: str, token: str | None, timeout: float) -> ReferenceInfo:
    """Blocking GET /v1/shadow/info. ReferenceUnavailableError when it cannot be reached,
    ShadowReferenceError when it answers but not usably (a wrong token, not a reference)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = httpx.get(f"{url.rstrip('/')}/v1/shadow/info", headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise ReferenceUnavailableError(f"remote reference {url} unavailable: {exc or type(exc).__name__}") from exc
    if reply.status_code in UNREACHABLE_STATUSES:
        raise ReferenceUnavailableError(f"remote reference {url} unavailable: it answered {reply.status_code}")
    if reply.status_code != 200:
        raise ShadowReferenceError(f"remote reference {url} unavailable: it answered {reply.status_code}: {reply.text[:200]}")
    try:
        return ReferenceInfo.model_validate_json(reply.content)
    except ValidationError as exc:
        raise ShadowReferenceError(f"remote reference {url}: /v1/shadow/info is not a reference's answer: {exc}") from exc


class RemoteScorer:
    cancellable = True

    def __init__(self, url: str, token: str | None, timeout: float, info: ReferenceInfo | None, name: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._url, self._token, self._timeout = url, token, timeout
        self.info = info
        # The `reference` label is fixed when the metrics are built: a pending reference is
        # named by --shadow-reference-name, else by its address.
        self.name = info.name if info is not None else name or urlsplit(url).netloc or url
        self.vocab = VocabInfo(info.vocab_size, info.vocab_sha256) if info is not None else None
        self.noise_dtype: str | None = None
        self.state: str = UP if info is not None else UNREACHABLE  # see Scorer.state
        self.problem: str | None = None  # why it is disabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, url: str, token: str | None, timeout: float) -> RemoteScorer:
        """Blocking: reads the service's identity (name, vocabulary) once at start-up."""
        return cls(url, token, timeout, fetch_info(url, token, timeout))

    @classmethod
    def pending(cls, url: str, token: str | None, timeout: float, name: str | None = None) -> RemoteScorer:
        """A reference not reachable yet: checked and used once `retry_in_background` reaches it."""
        return cls(url, token, timeout, None, name)

    @property
    def ready(self) -> bool:
        """Whether samples can be scored now (the shadow path counts them as errors if not)."""
        return self.state == UP

    @property
    def loaded_as(self) -> str:
        how = self.info.loaded_as if self.info is not None and self.info.loaded_as else "unknown"
        return f"remote reference service {self._url} ({how})"

    @property
    def integrity_problems(self) -> list[str]:
        """What the service's own load-time check found (it has the model; we do not)."""
        return [] if self.info is None else list(self.info.integrity_problems)

    @property
    def token_caps(self) -> tuple[int | None, int | None]:
        """The service's (per sequence, per padded batch) caps; None where unknown."""
        return (None, None) if self.info is None else (self.info.max_item_tokens, self.info.max_request_tokens)

    def enable_noise_floor(self, dtype: str) -> None:
        """The service computes its noise floor in the dtype it was started with; it must
        be the candidate's serving dtype, or the noise floor would measure another dtype.
        A pending reference is checked when it comes up."""
        if self.info is not None:
            self._check_noise_dtype(self.info, dtype)
        self.noise_dtype = dtype

    def _check_noise_dtype(self, info: ReferenceInfo, dtype: str) -> None:
        if info.noise_dtype != dtype:
            offered = info.noise_dtype or "none"
            raise ShadowReferenceError(
                f"the candidate is served in {dtype}, but the remote reference {self._url} computes its noise floor "
                f"in {offered}: start it with `--noise-dtype {dtype}`, or run this server with `--shadow-noise-floor off`"
            )

    def retry_in_background(
        self, check_vocab: Callable[[VocabInfo, str], None], first_delay: float = 1.0, max_delay: float = 30.0
    ) -> None:
        """Retry GET /v1/shadow/info (delays doubling from `first_delay` to `max_delay`) on
        a daemon thread; on an answer run `check_vocab(vocab, name)` and the noise-floor
        dtype check, as at start. Logs once per state change."""
        if self.state != UNREACHABLE or self._thread is not None:
            return
        log.warning(
            "shadow: remote reference %s unreachable; sampled requests count as errors while it is retried "
            "(every %g s, backing off to %g s)", self._url, first_delay, max_delay,
        )
        self._thread = threading.Thread(
            target=self._retry, args=(check_vocab, first_delay, max_delay), name="shadow-reference-connect", daemon=True
        )
        self._thread.start()

    def _retry(self, check_vocab: Callable[[VocabInfo, str], None], delay: float, max_delay: float) -> None:
        while not self._stop.is_set():
            try:
                info = fetch_info(self._url, self._token, min(self._timeout, 10.0))
            except ReferenceUnavailableError:
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, max_delay)
                continue
            except ShadowReferenceError as exc:
                self._disable(str(exc))
                return
            except Exception as exc:  # never let the thread die silently
                self._disable(f"unexpected error reaching the remote reference {self._url}: {exc!r}")
                return
            vocab = VocabInfo(info.vocab_size, info.vocab_sha256)
            try:
                check_vocab(vocab, info.name)
                if self.noise_dtype is not None:
                    self._check_noise_dtype(info, self.noise_dtype)
            except ShadowReferenceError as exc:
                self._disable(str(exc))
                return
            self.info, self.vocab = info, vocab
            log.warning("shadow: remote reference %s is up (%s); sampled requests are compared from now on", self._url, info.name)
            self.state = UP  # last: what `ready` reads
            return

    def _disable(self, problem: str) -> None:
        log.error("shadow: path DISABLED, sampled requests count as errors until restart: %s", problem)
        self.problem = problem
        self.state = DISABLED

    async def score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None,
                    adapter: str | None = None) -> list[ScoredSequence]:
        if adapter is not None:  # the server refuses a remote reference with mounted adapters; the last guard
            raise ShadowReferenceError(f"the remote reference serves one model: it cannot apply the adapter {adapter}")
        if self.state != UP:
            raise ReferenceUnavailableError(self.problem or f"remote reference {self._url} not reachable yet")
        body = ScoreRequestBody(
            items=[ScoreItemBody(prompt_ids=i.prompt_ids, output_ids=i.output_ids, candidate_ids=i.candidate_ids) for i in items],
            top_m=top_m,
            noise_top_k=noise_top_k,
        )
        reply = await self._client.post(SCORE_PATH, content=body.model_dump_json(), headers={"Content-Type": "application/json"})
        if reply.status_code != 200:
            raise ShadowReferenceError(f"remote reference answered {reply.status_code}: {reply.text[:200]}")
        parsed = ScoreResponseBody.model_validate_json(reply.content)
        if len(parsed.items) != len(items):
            raise ShadowReferenceError(f"remote reference returned {len(parsed.items)} items for {len(items)}")
        return [from_body(item, positions, noise_top_k is not None) for item, positions in zip(items, parsed.items)]

    async def close(self) -> None:
        self._stop.set()
        await self._client.aclose()
