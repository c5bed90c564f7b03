"""Mounted LoRA adapters on a remote reference: the candidate and the reference agree on
each adapter by its content hash (adapters/lora_identity.py), never by name alone
(docs/design.md, "Mounted adapters on a remote reference").

Mounting adapter NAME from DIR (the candidate's copy, or the reference's own copy named
by --shadow-reference-lora-modules; the same path on both hosts, as the chart mounts one
adapters volume on both pods):

- the reference holds NAME with DIR's hash: shadowed;
- it holds other weights under NAME: AdapterUnavailableError naming both hashes;
- it does not hold NAME and allows run-time loads: it is asked to load DIR (a refusal
  there is the load's refusal: ShadowReferenceError) and the hash it reports must match;
  the adapter is then this candidate's to unload;
- it does not hold NAME and may not load it: AdapterUnavailableError saying how to
  mount it there.

Every score request names the adapter with its hash and DIR, so a reference that lost it
(restarted) or never had it (another replica) loads it again if it may, and one holding
other weights refuses (409) instead of scoring them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from shadow.scoring import (
    LOAD_ADAPTER_PATH,
    UNLOAD_ADAPTER_PATH,
    AdapterInfo,
    AdapterRef,
    AdapterUnavailableError,
    ReferenceInfo,
    ReferenceUnavailableError,
    ShadowReferenceError,
)

log = logging.getLogger(__name__)


class RemoteAdapters:
    def __init__(self, url: str, token: str | None, timeout: float, fetch_info: Callable[[], ReferenceInfo]):
        """`fetch_info`: blocking GET /v1/shadow/info, the reference's answer now."""
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._fetch_info = fetch_info
        self._refs: dict[str, AdapterRef] = {}
        self._owned: set[str] = set()  # loaded on the reference by this candidate: unloaded by it

    def ref(self, name: str) -> AdapterRef:
        try:
            return self._refs[name]
        except KeyError:
            raise ShadowReferenceError(f"the adapter {name} is not mounted on the reference") from None

    def add(self, name: str, path: Path, reachable: bool) -> None:
        """Blocking. `reachable`: the reference answered and passed its checks; if not,
        the adapter is settled by its first score request."""
        from adapters.errors import AdapterError
        from adapters.lora_identity import adapter_sha256

        try:
            digest = adapter_sha256(Path(path))
        except AdapterError as exc:
            raise ShadowReferenceError(str(exc)) from exc
        ref = AdapterRef(name=name, sha256=digest, path=str(path))
        if reachable:
            try:
                self._agree(ref, self._fetch_info())
            except ReferenceUnavailableError as exc:
                log.warning("shadow: %s; the adapter %s is checked by its first score request", exc, name)
        self._refs[name] = ref

    def _agree(self, ref: AdapterRef, info: ReferenceInfo) -> None:
        held = next((a for a in info.adapters if a.name == ref.name), None)
        if held is not None:
            if held.sha256 != ref.sha256:
                raise AdapterUnavailableError(
                    f"the adapter {ref.name}: the remote reference {self._url} holds other weights under that name "
                    f"(sha256 {held.sha256[:12]}, from {held.path}) than this server's copy {ref.path} (sha256 "
                    f"{ref.sha256[:12]}); mount the same adapter on both, or name the reference's copy with "
                    f"--shadow-reference-lora-modules {ref.name}=DIR")
            return
        if not info.runtime_lora_updating:
            raise AdapterUnavailableError(
                f"the adapter {ref.name} is not on the remote reference {self._url} (it holds "
                f"{', '.join(a.name for a in info.adapters) or 'none'}), which does not allow run-time loads: mount it "
                f"there (`shadowserve reference --lora-modules {ref.name}={ref.path}`) or start it with "
                "--allow-runtime-lora-updating")
        loaded = self._post(LOAD_ADAPTER_PATH, {"lora_name": ref.name, "lora_path": ref.path})
        reported = AdapterInfo.model_validate_json(loaded.content)
        if reported.sha256 != ref.sha256:  # another file under that path on the reference's host
            self._post(UNLOAD_ADAPTER_PATH, {"lora_name": ref.name}, quiet=True)
            raise ShadowReferenceError(
                f"the adapter {ref.name}: the remote reference {self._url} read other weights at {ref.path} (sha256 "
                f"{reported.sha256[:12]}) than this server (sha256 {ref.sha256[:12]}): the two hosts do not see the "
                "same file there")
        self._owned.add(ref.name)
        log.info("shadow: adapter %s loaded on the remote reference %s (sha256 %s)", ref.name, self._url,
                 ref.sha256[:12])

    def remove(self, name: str) -> None:
        """Blocking: forget it; unload it from the reference if this candidate loaded it
        (best effort: a reference that is down or already lost it is fine)."""
        self._refs.pop(name, None)
        if name in self._owned:
            self._owned.discard(name)
            self._post(UNLOAD_ADAPTER_PATH, {"lora_name": name}, quiet=True)

    def _post(self, path: str, body: dict, quiet: bool = False) -> httpx.Response | None:
        """Blocking POST; errors raised (ShadowReferenceError with the reference's words,
        ReferenceUnavailableError when it cannot be reached), or logged when `quiet`."""
        try:
            reply = httpx.post(f"{self._url}{path}", json=body, headers=self._headers, timeout=self._timeout)
        except httpx.TransportError as exc:
            if quiet:
                log.warning("shadow: %s on the remote reference %s failed: %s", path, self._url, exc)
                return None
            raise ReferenceUnavailableError(f"remote reference {self._url} unavailable: {exc}") from exc
        if reply.status_code != 200:
            if quiet:
                log.warning("shadow: %s on the remote reference %s: %s %s", path, self._url, reply.status_code,
                            reply.text[:200])
                return None
            try:
                words = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                words = reply.text[:300]
            raise ShadowReferenceError(f"the remote reference {self._url} refused to load the adapter: {words}")
        return reply
