"""Client of a remote reference (`shadowserve reference`): the same statistics as the
local scorer, computed on the reference's own deployment (its own GPUs, its own
autoscaler)."""

from __future__ import annotations

import httpx

from shadow.compare import PositionStats
from shadow.scoring import (
    ReferenceError,
    ReferenceInfo,
    ScoreItem,
    ScoreItemBody,
    ScoreRequestBody,
    ScoreResponseBody,
    VocabInfo,
    from_body,
)


class RemoteScorer:
    def __init__(self, url: str, token: str | None, timeout: float, info: ReferenceInfo):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.info = info
        self.name = info.name
        self.vocab = VocabInfo(info.vocab_size, info.vocab_sha256)

    @classmethod
    def connect(cls, url: str, token: str | None, timeout: float) -> RemoteScorer:
        """Blocking: reads the service's identity (name, vocabulary) once at start-up."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            reply = httpx.get(f"{url.rstrip('/')}/v1/shadow/info", headers=headers, timeout=timeout)
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            raise ReferenceError(f"remote reference {url} unavailable: {exc}") from exc
        return cls(url, token, timeout, ReferenceInfo.model_validate_json(reply.content))

    async def score(self, items: list[ScoreItem], top_m: int) -> list[list[PositionStats]]:
        body = ScoreRequestBody(
            items=[ScoreItemBody(prompt_ids=i.prompt_ids, output_ids=i.output_ids, candidate_ids=i.candidate_ids) for i in items],
            top_m=top_m,
        )
        reply = await self._client.post("/v1/shadow/score", content=body.model_dump_json(), headers={"Content-Type": "application/json"})
        if reply.status_code != 200:
            raise ReferenceError(f"remote reference answered {reply.status_code}: {reply.text[:200]}")
        parsed = ScoreResponseBody.model_validate_json(reply.content)
        if len(parsed.items) != len(items):
            raise ReferenceError(f"remote reference returned {len(parsed.items)} items for {len(items)}")
        return [from_body(item, positions) for item, positions in zip(items, parsed.items)]

    async def close(self) -> None:
        await self._client.aclose()
