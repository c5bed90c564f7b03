"""Typed models of the custom resources the chart renders beyond the core API, written
from their CRDs (KEDA v2 `ScaledObject`, Prometheus Operator `RelabelConfig`): unknown
fields, wrong types and values outside an enum are errors, as the API server's CRD
validation would make them. No CRD can be fetched at test time (no network)."""

from __future__ import annotations

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
