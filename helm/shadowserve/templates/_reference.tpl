{{/*
The fp32 reference's pods, one template for all three shapes:
  - one pod, one GPU (tensorParallelSize 1): a Deployment;
  - one pod, N GPUs (tensorParallelSize N, nodes 1): a Deployment; `shadowserve reference
    --tensor-parallel-size N` launches its N ranks itself;
  - `nodes` pods of tensorParallelSize / nodes GPUs each (nodes > 1): a LeaderWorkerSet, each
    pod running its share of the ranks under torchrun, the leader (node rank 0, global rank
    0) the only one serving HTTP.
*/}}

{{/* "true" when the reference spans several pods (a LeaderWorkerSet), else "". */}}
{{- define "shadowserve.reference.multiNode" -}}
{{- if gt (int .Values.reference.nodes) 1 -}}true{{- end -}}
{{- end -}}

{{/* GPUs (ranks) on each reference pod. */}}
{{- define "shadowserve.reference.gpusPerPod" -}}
{{- div (int .Values.reference.tensorParallelSize) (int .Values.reference.nodes) -}}
{{- end -}}

{{/*
The reference's workload: the Deployment `<release>-reference`, or the LeaderWorkerSet
`<release>-reference-lws`. Not `<release>-reference`: the LWS controller creates a headless
Service of the LWS's own name (the pods' subdomain, which LWS_LEADER_ADDRESS resolves in),
and `<release>-reference` is the Service the candidates call.
*/}}
{{- define "shadowserve.reference.workloadName" -}}
{{ include "shadowserve.fullname" . }}-reference{{ if include "shadowserve.reference.multiNode" . }}-lws{{ end }}
{{- end -}}

{{/* The autoscalers' scaleTargetRef: a LeaderWorkerSet has the scale subresource too (one replica: one group). */}}
{{- define "shadowserve.reference.scaleTargetRef" -}}
{{- if include "shadowserve.reference.multiNode" . -}}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
{{- else -}}
apiVersion: apps/v1
kind: Deployment
{{- end }}
name: {{ include "shadowserve.reference.workloadName" . }}
{{- end -}}

{{/* What the reference would refuse, or could not run as, refused at render in the values' own terms. */}}
{{- define "shadowserve.reference.check" -}}
{{- $r := .Values.reference -}}
{{- $size := int $r.tensorParallelSize -}}
{{- $nodes := int $r.nodes -}}
{{- if mod $size $nodes -}}
{{- fail (printf "reference.tensorParallelSize %d does not divide over reference.nodes %d: each node runs tensorParallelSize / nodes ranks, one per GPU" $size $nodes) -}}
{{- end -}}
{{- if gt $size 1 -}}
{{- $given := list -}}
{{- if .Values.adapters.modules -}}{{- $given = append $given "adapters.modules" -}}{{- end -}}
{{- if .Values.adapters.runtimeUpdating -}}{{- $given = append $given "adapters.runtimeUpdating" -}}{{- end -}}
{{- if $r.adapterPath -}}{{- $given = append $given "reference.adapterPath" -}}{{- end -}}
{{- if $given -}}
{{- fail (printf "reference.tensorParallelSize %d with %s: a tensor-parallel reference mounts no LoRA adapter (peft's LoRA layers are not sharded by transformers' tensor-parallel plans); serve adapters on a reference of tensorParallelSize 1" $size (join ", " $given)) -}}
{{- end -}}
{{- end -}}
{{- if and (gt $nodes 1) (eq (int $r.masterPort) (int $r.port)) -}}
{{- fail (printf "reference.masterPort %d is reference.port: torchrun's rendezvous and the HTTP service both listen on the leader, give them different ports" (int $r.port)) -}}
{{- end -}}
{{- end -}}

{{/* `shadowserve reference` and its flags (one YAML list item a line), the same on every rank. */}}
{{- define "shadowserve.reference.args" -}}
- reference
- --model={{ .Values.reference.modelVolume.path }}
{{- if gt (int .Values.reference.tensorParallelSize) 1 }}
- --tensor-parallel-size={{ int .Values.reference.tensorParallelSize }}
{{- end }}
{{- with .Values.reference.adapterPath }}
- --adapter={{ . }}
{{- end }}
# The noise floor: the reference also runs in the candidates' serving dtype.
{{- if and .Values.candidate.shadow.noiseFloor (eq .Values.candidate.dtype "auto") }}
{{- fail "candidate.dtype must be explicit (bfloat16, float16 or float32) while candidate.shadow.noiseFloor is on: the reference computes the noise floor in that dtype" }}
{{- end }}
- --noise-dtype={{ .Values.candidate.shadow.noiseFloor | ternary .Values.candidate.dtype "none" }}
- --host=0.0.0.0
- --port={{ .Values.reference.port }}
- --max-item-tokens={{ .Values.reference.maxItemTokens }}
- --max-request-tokens={{ .Values.reference.maxRequestTokens }}
# The candidates' adapters on the one fp32 base, each under the name they mount it
# by, from the reference's own copy where one is given (the hash they expect).
{{- range .Values.adapters.modules }}
- {{ printf "--lora-modules=%s=%s" .name (.referencePath | default .path) | quote }}
{{- end }}
{{- if .Values.adapters.runtimeUpdating }}
- --allow-runtime-lora-updating=true
{{- end }}
- --max-adapters={{ .Values.adapters.referenceMaxAdapters }}
{{- end -}}

{{/*
reference.resources with the GPU limit (and request, where one is given) set to the pod's
share of a tensor-parallel reference: the resource `resources.limits` names ending in /gpu
(nvidia.com/gpu, amd.com/gpu), nvidia.com/gpu if none does. Unchanged at tensorParallelSize 1.
*/}}
{{- define "shadowserve.reference.resources" -}}
{{- $resources := deepCopy (.Values.reference.resources | default dict) -}}
{{- if gt (int .Values.reference.tensorParallelSize) 1 -}}
{{- $gpus := include "shadowserve.reference.gpusPerPod" . -}}
{{- $limits := $resources.limits | default dict -}}
{{- $named := list -}}
{{- range $key, $_ := $limits -}}
{{- if hasSuffix "/gpu" $key -}}{{- $named = append $named $key -}}{{- end -}}
{{- end -}}
{{- if gt (len $named) 1 -}}
{{- fail (printf "reference.resources.limits names %s: a tensor-parallel reference's GPUs are one resource: keep one (null removes a default's key)" (join ", " $named)) -}}
{{- end -}}
{{- $gpu := $named | first | default "nvidia.com/gpu" -}}
{{- $_ := set $limits $gpu $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- if and $resources.requests (hasKey $resources.requests $gpu) -}}
{{- $_ := set $resources.requests $gpu $gpus -}}
{{- end -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
A reference pod's spec. Argument: dict "root" (the chart's context) "role": "single" (the
Deployment's pod: every rank of this node, the service included), "leader" (a
LeaderWorkerSet's node rank 0: global rank 0 serves HTTP) or "worker" (node ranks 1..: no
HTTP, no probes, only compute). Every role has the same flags, env, volumes and resources.
*/}}
{{- define "shadowserve.reference.podSpec" -}}
{{- $root := .root -}}
{{- $r := $root.Values.reference -}}
{{- $serves := ne .role "worker" -}}
{{- $tensorParallel := gt (int $r.tensorParallelSize) 1 -}}
containers:
  - name: reference
    image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    {{- if eq .role "single" }}
    args:
      {{- include "shadowserve.reference.args" $root | nindent 6 }}
    {{- else }}
    # torchrun on every node, static rendezvous on the leader (LWS_WORKER_INDEX 0, the
    # node rank; LWS_LEADER_ADDRESS its address): tensorParallelSize ranks in all.
    command: [torchrun]
    args:
      - --nnodes={{ int $r.nodes }}
      - --nproc-per-node={{ include "shadowserve.reference.gpusPerPod" $root }}
      - --node-rank=$(LWS_WORKER_INDEX)
      - --master-addr=$(LWS_LEADER_ADDRESS)
      - --master-port={{ int $r.masterPort }}
      - --no-python
      - shadowserve
      {{- include "shadowserve.reference.args" $root | nindent 6 }}
    {{- end }}
    env:
      # Required on every rank: off loopback the reference refuses to start without a token.
      - name: SHADOWSERVE_REFERENCE_TOKENS
        valueFrom:
          secretKeyRef: {name: {{ include "shadowserve.referenceTokenSecret" $root }}, key: reference-token}
    {{- if $serves }}
    ports:
      - {name: http, containerPort: {{ $r.port }}}
    # The service listens only once the fp32 model is loaded (every rank's shard).
    startupProbe:
      tcpSocket: {port: http}
      periodSeconds: 10
      failureThreshold: 90
    readinessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 5
    {{- end }}
    resources:
      {{- include "shadowserve.reference.resources" $root | nindent 6 }}
    volumeMounts:
      - {name: models, mountPath: {{ dir $r.modelVolume.path }}, readOnly: true}
      {{- if $tensorParallel }}
      # NCCL between the ranks of this pod: a container's 64 MiB /dev/shm is too small.
      - {name: shm, mountPath: /dev/shm}
      {{- end }}
      {{- if include "shadowserve.adaptersMounted" $root }}
      # The candidates' mount path: a score request names an adapter by their path.
      - {name: adapters, mountPath: {{ $root.Values.adapters.volume.mountPath }}, readOnly: true}
      {{- end }}
volumes:
  - name: models
    persistentVolumeClaim: {claimName: {{ $r.modelVolume.claimName }}, readOnly: true}
  {{- if $tensorParallel }}
  - name: shm
    emptyDir: {medium: Memory, sizeLimit: {{ $r.shmSize | default "1Gi" }}}
  {{- end }}
  {{- if include "shadowserve.adaptersMounted" $root }}
  - name: adapters
    persistentVolumeClaim: {claimName: {{ $root.Values.adapters.volume.claimName }}, readOnly: true}
  {{- end }}
{{- end -}}
