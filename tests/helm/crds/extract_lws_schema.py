"""Regenerate leaderworkerset.x-k8s.io_v1.json: the OpenAPI v3 schema the LeaderWorkerSet
CRD declares (github.com/kubernetes-sigs/lws, config/crd/bases/
leaderworkerset.x-k8s.io_leaderworkersets.yaml), which the API server validates a
LeaderWorkerSet against.

    python tests/helm/crds/extract_lws_schema.py PATH/TO/lws.git [REF]

PATH is a clone (or bare git dir) of kubernetes-sigs/lws; REF defaults to the release tag
below. The `v1` version's openAPIV3Schema is copied verbatim except for the `description`
fields (prose, most of the file's size) and `status` (written by the controller, never
by the chart); the source is recorded in the output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REF = "v0.10.0"
CRD = "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"
OUT = Path(__file__).with_name("leaderworkerset.x-k8s.io_v1.json")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def _drop_descriptions(node):
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def extract(crd: dict, version: str = "v1") -> dict:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _drop_descriptions(served["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    return {"subresources": served.get("subresources", {}), "openAPIV3Schema": schema}


def main(argv: list[str]) -> None:
    git_dir = argv[1]
    if Path(git_dir, ".git").is_dir():
        git_dir = str(Path(git_dir, ".git"))
    ref = argv[2] if len(argv) > 2 else REF
    commit = _git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
    date = _git(git_dir, "log", "-1", "--format=%cI", commit).strip()
    crd = yaml.safe_load(_git(git_dir, "show", f"{commit}:{CRD}"))
    out = {
        "source": {
            "repository": "https://github.com/kubernetes-sigs/lws",
            "path": CRD,
            "ref": ref,
            "commit": commit,
            "commit_date": date,
            "license": "Apache-2.0",
            "crd": crd["metadata"]["name"],
            "group": crd["spec"]["group"],
            "version": "v1",
        },
        **extract(crd),
    }
    # One key per line, unindented: a new release's schema diffs readably, at under half the indented size.
    OUT.write_text(json.dumps(out, indent=0) + "\n")
    print(f"{OUT}: {crd['metadata']['name']} v1 from {ref} ({commit})")


if __name__ == "__main__":
    main(sys.argv)
