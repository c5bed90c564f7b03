"""Typed models of the custom resources the chart renders beyond the core API, written
from their CRDs (KEDA v2 `ScaledObject`, Prometheus Operator `RelabelConfig`): unknown
fields, wrong types and values outside an enum are errors, as the API server's CRD
validation would make them. No CRD can be fetched at test time (no network).

The LeaderWorkerSet embeds two whole pod templates, too much to write by hand: it is
checked against its CRD's own schema instead, vendored in crds/ (crds/extract_lws_schema.py
cuts it from kubernetes-sigs/lws, at the release it records)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScaleTargetRef(_Strict):
    name: str
    apiVersion: str | None = None
    kind: str | None = None
    envSourceContainerName: str | None = None


class Trigger(_Strict):
    type: str
    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # KEDA's trigger metadata is map[string]string: a number must be written as a string.
    metadata: dict[str, str]
    metricType: Literal["AverageValue", "Value", "Utilization"] | None = None
    useCachedMetrics: bool | None = None
    authenticationRef: dict[str, str] | None = None


class Fallback(_Strict):
    failureThreshold: int = Field(ge=0)
    replicas: int = Field(ge=0)


class ScaledObjectSpec(_Strict):
    scaleTargetRef: ScaleTargetRef
    triggers: list[Trigger] = Field(min_length=1)
    pollingInterval: int | None = Field(default=None, ge=1)
    cooldownPeriod: int | None = Field(default=None, ge=0)
    idleReplicaCount: int | None = Field(default=None, ge=0)
    minReplicaCount: int | None = Field(default=None, ge=0)
    maxReplicaCount: int | None = Field(default=None, ge=1)
    fallback: Fallback | None = None
    advanced: dict | None = None


class Metadata(BaseModel):
    name: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class ScaledObject(_Strict):
    apiVersion: Literal["keda.sh/v1alpha1"]
    kind: Literal["ScaledObject"]
    metadata: Metadata
    spec: ScaledObjectSpec


class RelabelConfig(_Strict):
    """monitoring.coreos.com/v1 RelabelConfig (ServiceMonitor endpoints' metricRelabelings)."""

    sourceLabels: list[str] | None = None
    separator: str | None = None
    targetLabel: str | None = None
    regex: str | None = None
    modulus: int | None = None
    replacement: str | None = None
    action: Literal["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
                    "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                    "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"] | None = None

    def as_prometheus(self) -> dict:
        """The same rule in Prometheus' own config (what the Operator writes for it)."""
        names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
        rule = {names.get(k, k): v for k, v in self.model_dump(exclude_none=True).items()}
        if "action" in rule:
            rule["action"] = rule["action"].lower()
        return rule


# --- LeaderWorkerSet (leaderworkerset.x-k8s.io/v1), against its CRD's schema ----------------

LWS_SCHEMA = Path(__file__).with_name("crds") / "leaderworkerset.x-k8s.io_v1.json"


def _strict(schema: dict) -> dict:
    """The CRD's structural schema as a manifest meets it: a field it does not declare is an
    error (Helm's OpenAPI check and `kubectl apply`'s strict field validation refuse it)
    rather than silently pruned, so every object that lists its properties admits no other."""
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            strict["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            strict[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            strict[key] = [_strict(sub) for sub in schema[key]]
    return strict


@functools.cache
def lws_crd() -> dict:
    """The vendored schema: {"source", "subresources", "openAPIV3Schema"}."""
    return json.loads(LWS_SCHEMA.read_text())


@functools.cache
def _lws_validator():
    from jsonschema import Draft7Validator

    schema = _strict(lws_crd()["openAPIV3Schema"])
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def leaderworkerset_errors(doc: dict) -> list[str]:
    """What the API server would refuse in a LeaderWorkerSet manifest, one line per error
    (its JSON path, then why); empty: valid."""
    errors = [f"{doc.get('apiVersion')}/{doc.get('kind')}: not leaderworkerset.x-k8s.io/v1 LeaderWorkerSet"] if (
        doc.get("apiVersion"), doc.get("kind")) != ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet") else []
    for error in sorted(_lws_validator().iter_errors(doc), key=lambda e: e.json_path):
        errors.append(f"{error.json_path}: {error.message}")
    return errors
