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
