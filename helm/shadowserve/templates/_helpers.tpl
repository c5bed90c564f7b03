{{- define "shadowserve.fullname" -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shadowserve.labels" -}}
app.kubernetes.io/name: shadowserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
shadowserve.dev/variant: {{ .Values.variant }}
{{- end -}}

{{- define "shadowserve.selector" -}}
app.kubernetes.io/name: shadowserve
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shadowserve.secretName" -}}
{{ include "shadowserve.fullname" . }}-keys
{{- end -}}

{{/* The Secret (key `reference-token`) both the reference and the candidate read the token from. */}}
{{- define "shadowserve.referenceTokenSecret" -}}
{{- .Values.secret.existingReferenceTokenSecret | default (include "shadowserve.secretName" .) -}}
{{- end -}}

{{/*
The reference token this release's Secret holds: the user's; else the one an earlier
install generated (`existing`: that Secret as `lookup` returns it, empty when there is
none or no cluster); else, while this release deploys the reference, a random one.
*/}}
{{- define "shadowserve.referenceToken" -}}
{{- $existing := (.existing | default dict).data | default dict -}}
{{- if .Values.secret.referenceToken -}}
{{ .Values.secret.referenceToken }}
{{- else if index $existing "reference-token" -}}
{{ index $existing "reference-token" | b64dec }}
{{- else if .Values.reference.enabled -}}
{{ randAlphaNum 32 }}
{{- end -}}
{{- end -}}

{{/* Seconds the server drains for on shutdown: the grace period less the preStop sleep and a 5 s margin. */}}
{{- define "shadowserve.shutdownGrace" -}}
{{- $c := .Values.candidate -}}
{{- $grace := sub (sub (sub (int $c.terminationGracePeriodSeconds) (int $c.preStopSleepSeconds)) (int $c.shadow.drainSeconds)) 10 -}}
{{- if lt $grace 0 -}}
{{- fail "candidate.terminationGracePeriodSeconds must be at least candidate.preStopSleepSeconds + candidate.shadow.drainSeconds + 10" -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{/* The in-chart reference's name as `shadowserve reference` reports it: its directory[+adapter]. */}}
{{- define "shadowserve.referenceName" -}}
{{ base .Values.reference.modelVolume.path }}{{ with .Values.reference.adapterPath }}+{{ base . }}{{ end }}
{{- end -}}

{{/*
"true" while the shadow is on (a sampling rate, or the X-Shadow header honoured), else "".
`serve` refuses every --shadow-reference-* flag (and the reference token) while it is off.
*/}}
{{- define "shadowserve.shadowOn" -}}
{{- if or (gt (float64 .Values.candidate.shadow.rate) 0.0) .Values.candidate.shadow.allowHeader -}}true{{- end -}}
{{- end -}}

{{/* "true" when the pods mount the adapters volume: adapters given, or loaded at run time. */}}
{{- define "shadowserve.adaptersMounted" -}}
{{- if or .Values.adapters.modules .Values.adapters.runtimeUpdating -}}true{{- end -}}
{{- end -}}

{{/*
The adapters, checked before anything renders: what the pods would refuse at start, said
in the values' own terms. Every path lies under the adapters volume, the one place both
pods see the same file (the candidate hashes it, the reference loads it).
*/}}
{{- define "shadowserve.adapters.check" -}}
{{- $a := .Values.adapters -}}
{{- $root := printf "%s/" (trimSuffix "/" $a.volume.mountPath) -}}
{{- if include "shadowserve.adaptersMounted" . -}}
{{- range $models := list .Values.candidate.modelVolume.path .Values.reference.modelVolume.path -}}
{{- if eq (trimSuffix "/" $a.volume.mountPath) (dir $models) -}}
{{- fail (printf "adapters.volume.mountPath %s is where the models volume is mounted: give the adapters their own mount path" $a.volume.mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $module := $a.modules -}}
{{- if hasKey $seen $module.name -}}
{{- fail (printf "adapters.modules: the name %q is given twice (each adapter is mounted, and judged, under its own name)" $module.name) -}}
{{- end -}}
{{- $_ := set $seen $module.name true -}}
{{- if eq $module.name $.Values.candidate.servedModelName -}}
{{- fail (printf "adapters.modules: %q is candidate.servedModelName, the base model's name: give the adapter another name" $module.name) -}}
{{- end -}}
{{- range $key := list "path" "referencePath" -}}
{{- $path := index $module $key -}}
{{- if and $path (not (hasPrefix $root $path)) -}}
{{- fail (printf "adapters.modules %s: %s %s is not under adapters.volume.mountPath %s, the volume both pods read it from" $module.name $key $path $a.volume.mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $a.maxLoras $a.maxCpuLoras (lt (int $a.maxCpuLoras) (int $a.maxLoras)) -}}
{{- fail (printf "adapters.maxCpuLoras (%v) must be at least adapters.maxLoras (%v)" $a.maxCpuLoras $a.maxLoras) -}}
{{- end -}}
{{- if and $a.maxCpuLoras (gt (len $a.modules) (int $a.maxCpuLoras)) -}}
{{- fail (printf "adapters.modules: %d adapters, but adapters.maxCpuLoras is %v" (len $a.modules) $a.maxCpuLoras) -}}
{{- end -}}
{{- if .Values.reference.enabled -}}
{{- if and $a.modules .Values.reference.adapterPath -}}
{{- fail "reference.adapterPath makes the reference base + one adapter (the reference of a merged-LoRA candidate); adapters.modules mounts adapters on the bare base: give one or the other" -}}
{{- end -}}
{{- if gt (len $a.modules) (int $a.referenceMaxAdapters) -}}
{{- fail (printf "adapters.modules: %d adapters, but adapters.referenceMaxAdapters is %v" (len $a.modules) $a.referenceMaxAdapters) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shadowserve.referenceUrl" -}}
{{- if .Values.reference.enabled -}}
http://{{ include "shadowserve.fullname" . }}-reference:{{ .Values.reference.port }}
{{- else -}}
{{ required "reference.externalUrl is required when reference.enabled is false" .Values.reference.externalUrl }}
{{- end -}}
{{- end -}}

{{/* PromQL label matcher for this release's series. */}}
{{- define "shadowserve.matcher" -}}
model="{{ .Values.candidate.servedModelName }}",variant="{{ .Values.variant }}"
{{- end -}}

{{/*
The canary gates' matcher: this release's series, and with `analysis.adapter` a string
only that adapter's ("" the base model's: in Prometheus an empty label is an absent one).
null: every adapter's, which the gates then combine (one adapter's fail is a fail).
*/}}
{{- define "shadowserve.analysisMatcher" -}}
{{ include "shadowserve.matcher" . }}{{ if kindIs "string" .Values.analysis.adapter }},adapter={{ .Values.analysis.adapter | quote }}{{ end }}
{{- end -}}

{{/*
The verdict's paired statistics in PromQL, by (model, variant, adapter): the candidate against
the noise floor (the reference in the serving dtype vs fp32, on the same positions).
Arguments (a dict): m = label matchers ending in a comma ("" for all series), w = window,
floor = smallest noise KL per token a ratio is taken against (an fp32 noise floor is 0).
Each LoRA adapter (label `adapter`, absent for the base model) is judged on its own.
*/}}
{{- define "shadowserve.promql.klRatio" -}}
sum by (model, variant, adapter) (rate(shadow_token_kl_divergence_sum{ {{- .m }}comparison="candidate"}[{{ .w }}]))
  / (
    (sum by (model, variant, adapter) (rate(shadow_token_kl_divergence_sum{ {{- .m }}comparison="noise_floor"}[{{ .w }}]))
      >= {{ .floor }} * sum by (model, variant, adapter) (rate(shadow_token_kl_divergence_count{ {{- .m }}comparison="noise_floor"}[{{ .w }}])))
    or {{ .floor }} * sum by (model, variant, adapter) (rate(shadow_token_kl_divergence_count{ {{- .m }}comparison="noise_floor"}[{{ .w }}]))
  )
{{- end -}}

{{- define "shadowserve.promql.excessTop1" -}}
(
  sum by (model, variant, adapter) (rate(shadow_tokens_total{ {{- .m }}comparison="candidate",top1="different"}[{{ .w }}]))
  - sum by (model, variant, adapter) (rate(shadow_tokens_total{ {{- .m }}comparison="noise_floor",top1="different"}[{{ .w }}]))
) / sum by (model, variant, adapter) (rate(shadow_tokens_total{ {{- .m }}comparison="candidate"}[{{ .w }}]))
{{- end -}}

{{- define "shadowserve.promql.excessHard" -}}
(
  sum by (model, variant, adapter) (rate(shadow_sequences_total{ {{- .m }}comparison="candidate",result="hard"}[{{ .w }}]))
  - sum by (model, variant, adapter) (rate(shadow_sequences_total{ {{- .m }}comparison="noise_floor",result="hard"}[{{ .w }}]))
) / sum by (model, variant, adapter) (rate(shadow_sequences_total{ {{- .m }}comparison="candidate"}[{{ .w }}]))
{{- end -}}

{{/* Series (value 1) for the (model, variant, adapter) groups with enough data in the window to judge. */}}
{{- define "shadowserve.promql.enough" -}}
sum by (model, variant, adapter) (increase(shadow_token_kl_divergence_count{ {{- .m }}comparison="noise_floor"}[{{ .w }}])) >= {{ .minTokens }}
  and on (model, variant, adapter)
sum by (model, variant, adapter) (increase(shadow_compared_sequence_tokens_count{ {{- .m }}comparison="noise_floor"}[{{ .w }}])) >= {{ .minSequences }}
{{- end -}}

{{/* A canary gate's query: the statistic where there is enough data, NaN otherwise (Argo
reads NaN as neither success nor failure: inconclusive; Flagger as a failed check). */}}
{{- define "shadowserve.promql.gate" -}}
(
  {{- include (printf "shadowserve.promql.%s" .stat) . | nindent 2 }}
) and on (model, variant, adapter) (
  {{- include "shadowserve.promql.enough" . | nindent 2 }}
) or on () vector(NaN)
{{- end -}}
