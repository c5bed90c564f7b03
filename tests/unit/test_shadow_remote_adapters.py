"""Mounted adapters on a remote reference (shadow/remote_adapters.py): candidate and
reference agree on an adapter by its content hash, never by its name alone. The adapter's
hash and the reference's HTTP answers are doubles here; the real exchange runs in
tests/integration/test_shadow_remote.py."""

from __future__ import annotations

import httpx
import pytest

from adapters import lora_identity
from adapters.errors import AdapterError
from shadow.remote_adapters import RemoteAdapters
from shadow.scoring import (
    LOAD_ADAPTER_PATH,
    UNLOAD_ADAPTER_PATH,
    AdapterInfo,
    AdapterUnavailableError,
    ReferenceInfo,
    ReferenceUnavailableError,
    ShadowReferenceError,
)

URL = "http://reference:8001"
OURS, THEIRS = "a" * 64, "b" * 64


def info(*held: AdapterInfo, runtime: bool = False) -> ReferenceInfo:
    return ReferenceInfo(name="ref", vocab_size=3, vocab_sha256="x", dtype="float32", adapters=list(held),
                         runtime_lora_updating=runtime)


class Reference:
    """Answers POSTs as a reference would: a load reports the hash it read (`reads`)."""

    def __init__(self, reads: str = OURS, status: int = 200, down: bool = False):
        self.reads, self.status, self.down = reads, status, down
        self.posts: list[tuple[str, dict, dict]] = []

    def post(self, url: str, json: dict, headers: dict, timeout: float) -> httpx.Response:
        path = url.removeprefix(URL)
        self.posts.append((path, json, headers))
        if self.down:
            raise httpx.ConnectError("connection refused")
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "no room for another adapter"}})
        if path == LOAD_ADAPTER_PATH:
            return httpx.Response(200, json={"name": json["lora_name"], "sha256": self.reads, "path": json["lora_path"]})
        return httpx.Response(200, json={})


@pytest.fixture
def reference(monkeypatch) -> Reference:
    monkeypatch.setattr(lora_identity, "adapter_sha256", lambda path: OURS)
    double = Reference()
    monkeypatch.setattr(httpx, "post", double.post)
    return double


def remote(answer: ReferenceInfo) -> RemoteAdapters:
    return RemoteAdapters(URL, "secret", 5.0, lambda: answer)


def test_a_reference_holding_the_same_weights_shadows_it_as_it_is(reference):
    adapters = remote(info(AdapterInfo(name="tenant-a", sha256=OURS, path="/theirs")))
    adapters.add("tenant-a", "/adapters/tenant-a", reachable=True)
    ref = adapters.ref("tenant-a")
    assert (ref.name, ref.sha256, ref.path) == ("tenant-a", OURS, "/adapters/tenant-a")
    adapters.remove("tenant-a")
    assert reference.posts == []  # not ours to unload
    with pytest.raises(ShadowReferenceError, match="tenant-a is not mounted on the reference"):
        adapters.ref("tenant-a")


def test_other_weights_under_the_name_are_refused_naming_both_hashes(reference):
    adapters = remote(info(AdapterInfo(name="tenant-a", sha256=THEIRS, path="/theirs")))
    with pytest.raises(AdapterUnavailableError, match=f"holds other weights .*sha256 {THEIRS[:12]}.*sha256 {OURS[:12]}"):
        adapters.add("tenant-a", "/adapters/tenant-a", reachable=True)


def test_a_reference_that_may_not_load_it_says_how_to_mount_it(reference):
    adapters = remote(info(AdapterInfo(name="other", sha256=THEIRS, path="/o")))
    with pytest.raises(AdapterUnavailableError, match=r"it holds other\), .*--lora-modules tenant-a=/adapters/tenant-a"):
        adapters.add("tenant-a", "/adapters/tenant-a", reachable=True)


def test_a_reference_that_may_load_it_is_asked_to_and_it_is_unloaded_on_removal(reference):
    adapters = remote(info(runtime=True))
    adapters.add("tenant-a", "/adapters/tenant-a", reachable=True)
    auth = {"Authorization": "Bearer secret"}
    assert reference.posts == [(LOAD_ADAPTER_PATH, {"lora_name": "tenant-a", "lora_path": "/adapters/tenant-a"}, auth)]
    adapters.remove("tenant-a")
    assert reference.posts[1:] == [(UNLOAD_ADAPTER_PATH, {"lora_name": "tenant-a"}, auth)]
    adapters.remove("tenant-a")
    assert len(reference.posts) == 2


def test_a_load_that_read_other_weights_is_undone_and_refused(reference):
    reference.reads = THEIRS
    with pytest.raises(ShadowReferenceError, match="the two hosts do not see the same file there"):
        remote(info(runtime=True)).add("tenant-a", "/adapters/tenant-a", reachable=True)
    assert [path for path, _, _ in reference.posts] == [LOAD_ADAPTER_PATH, UNLOAD_ADAPTER_PATH]


def test_a_refused_load_carries_the_references_words(reference):
    reference.status = 400
    with pytest.raises(ShadowReferenceError, match="refused to load the adapter: no room for another adapter"):
        remote(info(runtime=True)).add("tenant-a", "/adapters/tenant-a", reachable=True)


def test_an_unreachable_reference_leaves_the_adapter_to_its_first_score_request(reference):
    def down() -> ReferenceInfo:
        raise ReferenceUnavailableError("remote reference down")

    adapters = RemoteAdapters(URL, None, 5.0, down)
    adapters.add("tenant-a", "/adapters/tenant-a", reachable=True)
    adapters.add("tenant-b", "/adapters/tenant-b", reachable=False)
    assert adapters.ref("tenant-a").sha256 == adapters.ref("tenant-b").sha256 == OURS and reference.posts == []
    # Reachable for its info, then down for the load: the same, and it is not this candidate's to unload.
    reference.down = True
    adapters = remote(info(runtime=True))
    adapters.add("tenant-c", "/adapters/tenant-c", reachable=True)
    assert adapters.ref("tenant-c").sha256 == OURS and len(reference.posts) == 1
    adapters.remove("tenant-c")
    assert len(reference.posts) == 1


def test_a_directory_that_is_not_an_adapter_is_a_reference_error(reference, monkeypatch):
    def not_an_adapter(path):
        raise AdapterError(f"{path} is not a LoRA adapter")

    monkeypatch.setattr(lora_identity, "adapter_sha256", not_an_adapter)
    with pytest.raises(ShadowReferenceError, match="/adapters/x is not a LoRA adapter"):
        remote(info(runtime=True)).add("x", "/adapters/x", reachable=True)
