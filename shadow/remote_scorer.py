"""Client of a remote reference (`shadowserve reference`): the same statistics as the
local scorer, computed on the reference's own deployment (its own GPUs, its own
autoscaler).

A background thread watches the service (GET /v1/shadow/info): every `probe_s` while
it answers, with capped exponential backoff while it does not. `reachable` is what the
`shadow_reference_up` gauge reads; a failed score call also clears it at once.

- A reference unreachable when the server starts does not stop it (`pending`): the
  scorer starts `unreachable` and sampled requests wait in the queue. When it answers,
  the checks of a start run (vocabulary, noise-floor dtype): they pass, `up`; they fail,
  `disabled`, logged at ERROR, and sampled requests count as errors rather than compare
  against the wrong reference.
- A reference that answers again after an outage (a restarted pod, another replica) is
  checked the same way before anything is scored on it again, and must be the same
  reference (its name): one replaced by another model is `disabled`, so the verdict
  never mixes two references.
- A score call that fails for a reason outside the request (unreachable, timed out, 429,
  502-504, a busy 503) raises ReferenceUnavailableError: the shadow path keeps the
  samples and retries (shadow/worker.py). A 404/409 about a mounted adapter raises
  AdapterUnavailableError; any other answer ShadowReferenceError (not retried).

Mounted adapters agree by content hash (shadow/remote_adapters.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from shadow.remote_adapters import RemoteAdapters
from shadow.scoring import (
    ADAPTER_CONFLICT,
    ADAPTER_NOT_LOADED,
    SCORE_PATH,
    AdapterUnavailableError,
    ReferenceInfo,
    ReferenceUnavailableError,
    ScoredSequence,
    ScoreItem,
    ScoreItemBody,
    ScoreRequestBody,
    ScoreResponseBody,
    ShadowReferenceError,
    VocabInfo,
    from_body,
)

__all__ = ["DISABLED", "UNREACHABLE", "UP", "ReferenceUnavailableError", "RemoteScorer", "fetch_info"]

UNREACHABLE_STATUSES = (502, 503, 504)  # a proxy in front of a reference that is not up (yet)
RETRY_STATUSES = (429, 502, 503, 504)  # a score call answered so is retried later
UNREACHABLE, UP, DISABLED = "unreachable", "up", "disabled"
PROBE_S = 10.0  # how often an answering reference is looked at (the up gauge's resolution)

log = logging.getLogger(__name__)


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


def retry_after(reply: httpx.Response) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is not used by references)."""
    try:
        return max(0.0, float(reply.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


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
        self.reachable = info is not None  # whether the last contact succeeded (the up gauge)
        self.problem: str | None = None  # why it is disabled
        self.adapters = RemoteAdapters(url, token, timeout, lambda: fetch_info(url, token, min(timeout, 10.0)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, url: str, token: str | None, timeout: float) -> RemoteScorer:
        """Blocking: reads the service's identity (name, vocabulary) once at start-up."""
        return cls(url, token, timeout, fetch_info(url, token, timeout))

    @classmethod
    def pending(cls, url: str, token: str | None, timeout: float, name: str | None = None) -> RemoteScorer:
        """A reference not reachable yet: checked and used once `monitor` reaches it."""
        return cls(url, token, timeout, None, name)

    @property
    def url(self) -> str:
        return self._url

    @property
    def ready(self) -> bool:
        """Whether samples can be scored now (checked and not disabled)."""
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

    # --- mounted adapters (shadow/remote_adapters.py) ----------------------------------

    def add_adapter(self, name: str, path) -> None:
        """Blocking: the reference holds `path`'s content under `name`, or loads it (when it
        allows run-time loads); AdapterUnavailableError when it cannot take it. A reference
        not reachable yet is asked by the adapter's first score request."""
        self.adapters.add(name, path, reachable=self.state == UP)

    def remove_adapter(self, name: str) -> None:
        self.adapters.remove(name)

    # --- the watch ---------------------------------------------------------------------

    def monitor(self, check_vocab: Callable[[VocabInfo, str], None], first_delay: float = 1.0, max_delay: float = 10.0,
                probe_s: float = PROBE_S) -> None:
        """Watch the service on a daemon thread (see the module's docstring); on a first
        answer, or one after an outage, run `check_vocab(vocab, name)` and the noise-floor
        dtype check. Logs once per state change."""
        if self._thread is not None:
            return
        if self.state == UNREACHABLE:
            log.warning("shadow: remote reference %s unreachable; sampled requests wait in the queue while it is "
                        "retried (every %g s, backing off to %g s)", self._url, first_delay, max_delay)
        self._thread = threading.Thread(target=self._watch, args=(check_vocab, first_delay, max_delay, probe_s),
                                        name="shadow-reference-watch", daemon=True)
        self._thread.start()

    def _watch(self, check_vocab, first_delay: float, max_delay: float, probe_s: float) -> None:
        delay = first_delay
        while not self._stop.is_set() and self.state != DISABLED:
            try:
                info = fetch_info(self._url, self._token, min(self._timeout, 10.0))
            except Exception as exc:  # never let the thread die silently
                # Not an answer to check: unreachable, or (a 401, a 500, an ingress's page, a body
                # that does not parse) an answer that is not the reference's. At first contact
                # the latter is a configuration to fix; once it was up, an outage like another.
                if self.state == UNREACHABLE and isinstance(exc, ShadowReferenceError) and \
                        not isinstance(exc, ReferenceUnavailableError):
                    self._disable(str(exc))
                    return
                self._lost(str(exc) or type(exc).__name__)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, max_delay)
                continue
            delay = first_delay
            if not self._answered(info, check_vocab):
                return
            if self._stop.wait(probe_s):
                return

    def _answered(self, info: ReferenceInfo, check_vocab) -> bool:
        """The service answered: check it when it is new (first contact, or back after an
        outage), then mark it reachable. False when it failed the checks (disabled)."""
        if self.state == UP and self.reachable and info == self.info:
            return True
        try:
            if self.state == UP and info.name != self.info.name:
                raise ShadowReferenceError(
                    f"the remote reference {self._url} is another model now ({info.name}, was {self.info.name}): the "
                    "verdict would mix two references; restart this server to judge against the new one")
            check_vocab(VocabInfo(info.vocab_size, info.vocab_sha256), info.name)
            if self.noise_dtype is not None:
                self._check_noise_dtype(info, self.noise_dtype)
        except ShadowReferenceError as exc:
            self._disable(str(exc))
            return False
        first = self.state != UP
        self.info, self.vocab = info, VocabInfo(info.vocab_size, info.vocab_sha256)
        if first or not self.reachable:
            log.warning("shadow: remote reference %s is up (%s); sampled requests are compared from now on",
                        self._url, info.name)
        self.reachable = True
        self.state = UP  # last: what `ready` reads
        return True

    def _lost(self, why: str = "") -> None:
        if self.reachable:
            log.warning("shadow: remote reference %s is not answering%s; sampled requests wait in the queue and are "
                        "retried", self._url, f" ({why})" if why else "")
        self.reachable = False

    def _disable(self, problem: str) -> None:
        log.error("shadow: path DISABLED, sampled requests count as errors until restart: %s", problem)
        self.problem = problem
        self.state = DISABLED

    # --- scoring -----------------------------------------------------------------------

    async def score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None,
                    adapter: str | None = None) -> list[ScoredSequence]:
        if self.state == DISABLED:
            raise ShadowReferenceError(self.problem or f"remote reference {self._url} disabled")
        if self.state != UP:
            raise ReferenceUnavailableError(f"remote reference {self._url} not reachable yet")
        if not self.reachable:  # back only once the watch has checked it again: it may be another reference now
            raise ReferenceUnavailableError(f"remote reference {self._url} not answering")
        body = ScoreRequestBody(
            items=[ScoreItemBody(prompt_ids=i.prompt_ids, output_ids=i.output_ids, candidate_ids=i.candidate_ids) for i in items],
            top_m=top_m,
            noise_top_k=noise_top_k,
            adapter=None if adapter is None else self.adapters.ref(adapter),
        )
        try:
            reply = await self._client.post(SCORE_PATH, content=body.model_dump_json(),
                                            headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            self._lost()
            raise ReferenceUnavailableError(f"remote reference {self._url} unavailable: {exc or type(exc).__name__}") \
                from exc
        if reply.status_code != 200:
            raise self._failure(reply, adapter)
        parsed = ScoreResponseBody.model_validate_json(reply.content)
        if self.info is not None and parsed.reference != self.info.name:
            # Another model behind the same address (a replica the watch has not seen yet): never
            # scored; the watch checks the reference again before anything is.
            self._lost(f"answered by {parsed.reference}, not {self.info.name}")
            raise ReferenceUnavailableError(f"remote reference {self._url} answered as {parsed.reference}, "
                                            f"not {self.info.name}")
        if len(parsed.items) != len(items):
            raise ShadowReferenceError(f"remote reference returned {len(parsed.items)} items for {len(items)}")
        return [from_body(item, positions, noise_top_k is not None) for item, positions in zip(items, parsed.items)]

    def _failure(self, reply: httpx.Response, adapter: str | None) -> ShadowReferenceError:
        """What a non-200 answer means for the samples: retry, the adapter's end, or an error."""
        code = _error_code(reply)
        text = f"remote reference answered {reply.status_code}: {reply.text[:300]}"
        if reply.status_code in RETRY_STATUSES:
            if code is None and reply.status_code != 429:  # not the service's own answer: a proxy with nothing behind
                self._lost(f"a proxy answered {reply.status_code}")
            error = ReferenceUnavailableError(text)
            error.retry_after = retry_after(reply)
            return error
        if adapter is not None and code in (ADAPTER_NOT_LOADED, ADAPTER_CONFLICT):
            return AdapterUnavailableError(f"the remote reference {self._url} cannot apply the adapter {adapter}: "
                                           f"{_message(reply)}")
        return ShadowReferenceError(text)

    async def close(self) -> None:
        self._stop.set()
        await self._client.aclose()


def _error_code(reply: httpx.Response) -> str | None:
    """The `code` of an OpenAI-shaped error a shadowserve service sends ("" when it has
    none); None when the body is not one (a proxy's page)."""
    try:
        error = reply.json()["error"]
        return error.get("code") or error.get("type") or ""
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:300]
