"""Client of a remote reference (`shadowserve reference`): the same statistics as the
local scorer, computed on the reference's own deployment (its own GPUs, its own
autoscaler)."""

from __future__ import annotations

import httpx

from shadow.scoring import (
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


class RemoteScorer:
    def __init__(self, url: str, token: str | None, timeout: float, info: ReferenceInfo):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._url = url
        self.info = info
        self.name = info.name
        self.vocab = VocabInfo(info.vocab_size, info.vocab_sha256)
        self.noise_dtype: str | None = None

    @classmethod
    def connect(cls, url: str, token: str | None, timeout: float) -> RemoteScorer:
        """Blocking: reads the service's identity (name, vocabulary) once at start-up."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            reply = httpx.get(f"{url.rstrip('/')}/v1/shadow/info", headers=headers, timeout=timeout)
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            raise ShadowReferenceError(f"remote reference {url} unavailable: {exc}") from exc
        return cls(url, token, timeout, ReferenceInfo.model_validate_json(reply.content))

    def enable_noise_floor(self, dtype: str) -> None:
        """The service computes its noise floor in the dtype it was started with; it must
        be the candidate's serving dtype, or the noise floor would measure another dtype."""
        if self.info.noise_dtype != dtype:
            offered = self.info.noise_dtype or "none"
            raise ShadowReferenceError(
                f"the candidate is served in {dtype}, but the remote reference {self._url} computes its noise floor "
                f"in {offered}: start it with `--noise-dtype {dtype}`, or run this server with `--shadow-noise-floor off`"
            )
        self.noise_dtype = dtype

    async def score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None) -> list[ScoredSequence]:
        body = ScoreRequestBody(
            items=[ScoreItemBody(prompt_ids=i.prompt_ids, output_ids=i.output_ids, candidate_ids=i.candidate_ids) for i in items],
            top_m=top_m,
            noise_top_k=noise_top_k,
        )
        reply = await self._client.post("/v1/shadow/score", content=body.model_dump_json(), headers={"Content-Type": "application/json"})
        if reply.status_code != 200:
            raise ShadowReferenceError(f"remote reference answered {reply.status_code}: {reply.text[:200]}")
        parsed = ScoreResponseBody.model_validate_json(reply.content)
        if len(parsed.items) != len(items):
            raise ShadowReferenceError(f"remote reference returned {len(parsed.items)} items for {len(items)}")
        return [from_body(item, positions, noise_top_k is not None) for item, positions in zip(items, parsed.items)]

    async def close(self) -> None:
        await self._client.aclose()
