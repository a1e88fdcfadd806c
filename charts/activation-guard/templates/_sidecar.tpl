{{/*
The sidecar's public named templates: include them in your own inference Deployment (from a
parent chart that depends on this one, pass `.Subcharts.<alias>`; inside this chart, `.`).
README.md shows the few lines. Each renders a YAML fragment to `nindent` into place:

  activation-guard.sidecar.podLabels          pod labels (the PodMonitor selects on them)
  activation-guard.sidecar.podAnnotations     checksum/config (+ Prometheus scrape annotations)
  activation-guard.sidecar.initContainers     SAE copy init container; the guard when native
  activation-guard.sidecar.containers         the guard when it is not a native sidecar
  activation-guard.sidecar.volumes            socket, config, tmp, SAE and shared-memory volumes
  activation-guard.sidecar.hostVolumeMounts   what the host container mounts (socket, shm)
  activation-guard.sidecar.socketAddress      unix:///var/run/guard/socket/guard.sock, for the host
  activation-guard.sidecar.terminationGracePeriodSeconds   checked to exceed the drain period
*/}}

{{/* activation-guard.sidecar.socketAddress is the guard's gRPC address for the host. The socket
lives in a folder the guard creates (0750) inside the shared emptyDir: Kubernetes makes an
emptyDir writable by everyone, where another process could replace the socket file. */}}
{{- define "activation-guard.sidecar.socketAddress" -}}
{{- printf "unix://%s/socket/guard.sock" (clean .Values.socket.mountPath) }}
{{- end }}

{{/* activation-guard.sidecar.podLabels are map entries for the pod template's labels. */}}
{{- define "activation-guard.sidecar.podLabels" -}}
activation-guard/sidecar: {{ include "activation-guard.fullname" . }}
{{- end }}

{{/* activation-guard.sidecar.podAnnotations are map entries for the pod template's annotations. */}}
{{- define "activation-guard.sidecar.podAnnotations" -}}
checksum/config: {{ include "activation-guard.config" . | sha256sum }}
{{- if and .Values.metrics.enabled .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* activation-guard.sidecar.terminationGracePeriodSeconds fails unless it exceeds the guard's drain period. */}}
{{- define "activation-guard.sidecar.terminationGracePeriodSeconds" -}}
{{- $grace := .Values.terminationGracePeriodSeconds | int }}
{{- $drain := .Values.guard.server.drainGraceSeconds | float64 }}
{{- if le (float64 $grace) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than guard.server.drainGraceSeconds (%v): the guard needs the drain period after the host stops" $grace $drain) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/* activation-guard.sidecar.container is the guard container (one list item). */}}
{{- define "activation-guard.sidecar.container" -}}
{{- $guard := .Values.guard -}}
- name: activation-guard
  image: {{ include "activation-guard.image" . | quote }}
  imagePullPolicy: {{ $guard.image.pullPolicy }}
  {{- if include "activation-guard.nativeSidecar" . }}
  # A native sidecar: started before the host containers, stopped after them.
  restartPolicy: Always
  {{- end }}
  args: ["--config", {{ include "activation-guard.configPath" . | quote }}]
  ports:
    - name: guard-health
      containerPort: {{ $guard.healthPort }}
      protocol: TCP
    {{- if $guard.server.tcp.enabled }}
    - name: guard-grpc
      containerPort: {{ $guard.server.tcp.port }}
      protocol: TCP
    {{- end }}
    {{- if .Values.metrics.enabled }}
    - name: guard-metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
    {{- end }}
  env:
    {{- include "activation-guard.otelEnv" (dict "root" . "service" (include "activation-guard.otelServiceName" .) "container" "activation-guard") | nindent 4 }}
    {{- range $name, $value := $guard.env }}
    - name: {{ $name }}
      value: {{ toString $value | quote }}
    {{- end }}
  {{- with $guard.probes }}
  # gRPC health on the health port: NOT_SERVING until the SAEs are loaded and while draining.
  startupProbe:
    grpc:
      port: {{ $guard.healthPort }}
    periodSeconds: {{ .startup.periodSeconds }}
    timeoutSeconds: {{ .startup.timeoutSeconds }}
    failureThreshold: {{ .startup.failureThreshold }}
  readinessProbe:
    grpc:
      port: {{ $guard.healthPort }}
    periodSeconds: {{ .readiness.periodSeconds }}
    timeoutSeconds: {{ .readiness.timeoutSeconds }}
    failureThreshold: {{ .readiness.failureThreshold }}
  livenessProbe:
    grpc:
      port: {{ $guard.healthPort }}
    periodSeconds: {{ .liveness.periodSeconds }}
    timeoutSeconds: {{ .liveness.timeoutSeconds }}
    failureThreshold: {{ .liveness.failureThreshold }}
  {{- end }}
  {{- $resources := deepCopy ($guard.resources | default dict) }}
  {{- if .Values.gpu.enabled }}
  {{- $limits := get $resources "limits" | default dict }}
  {{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpu.count) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $guard.securityContext | nindent 4 }}
  volumeMounts:
    - name: guard-socket
      mountPath: {{ .Values.socket.mountPath }}
    - name: guard-config
      mountPath: {{ include "activation-guard.configPath" . | dir }}
      readOnly: true
    - name: guard-tmp
      mountPath: /tmp
    {{- if $guard.server.tls.secretName }}
    - name: guard-tls
      mountPath: /etc/guard-tls
      readOnly: true
    {{- end }}
    {{- if ne $guard.saeSource.type "none" }}
    - name: guard-saes
      mountPath: {{ $guard.saeSource.mountPath }}
      readOnly: true
      {{- if and (eq $guard.saeSource.type "persistentVolumeClaim") $guard.saeSource.persistentVolumeClaim.subPath }}
      subPath: {{ $guard.saeSource.persistentVolumeClaim.subPath }}
      {{- end }}
    {{- end }}
    {{- if .Values.sharedMemory.enabled }}
    - name: guard-shm
      mountPath: {{ .Values.sharedMemory.mountPath }}
    {{- end }}
{{- end }}

{{/* activation-guard.sidecar.saeCopyContainer copies the SAEs from an image into the SAE emptyDir (one list item). */}}
{{- define "activation-guard.sidecar.saeCopyContainer" -}}
{{- $source := .Values.guard.saeSource }}
{{- $copy := $source.initContainer -}}
- name: activation-guard-sae-copy
  image: {{ printf "%s:%s" $copy.image.repository $copy.image.tag | quote }}
  imagePullPolicy: {{ $copy.image.pullPolicy }}
  command: ["sh", "-c", 'cp -R "$SAE_SOURCE"/. "$SAE_TARGET"/']
  env:
    - name: SAE_SOURCE
      value: {{ $copy.sourcePath | quote }}
    - name: SAE_TARGET
      value: {{ $source.mountPath | quote }}
  {{- with $copy.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.guard.securityContext | nindent 4 }}
  volumeMounts:
    - name: guard-saes
      mountPath: {{ $source.mountPath }}
{{- end }}

{{/* activation-guard.sidecar.initContainers are list items for the pod's initContainers (may be empty). */}}
{{- define "activation-guard.sidecar.initContainers" -}}
{{- $items := list }}
{{- if eq .Values.guard.saeSource.type "initContainer" }}
{{- $items = append $items (include "activation-guard.sidecar.saeCopyContainer" .) }}
{{- end }}
{{- if include "activation-guard.nativeSidecar" . }}
{{- $items = append $items (include "activation-guard.sidecar.container" .) }}
{{- end }}
{{- join "\n" $items }}
{{- end }}

{{/* activation-guard.sidecar.containers are list items for the pod's containers (empty for a native sidecar). */}}
{{- define "activation-guard.sidecar.containers" -}}
{{- if not (include "activation-guard.nativeSidecar" .) }}
{{- include "activation-guard.sidecar.container" . }}
{{- end }}
{{- end }}

{{/* activation-guard.sidecar.hostVolumeMounts are list items for the host container's volumeMounts. */}}
{{- define "activation-guard.sidecar.hostVolumeMounts" -}}
- name: guard-socket
  mountPath: {{ .Values.socket.mountPath }}
{{- if .Values.sharedMemory.enabled }}
- name: guard-shm
  mountPath: {{ .Values.sharedMemory.mountPath }}
{{- end }}
{{- end }}

{{/* activation-guard.sidecar.volumes are list items for the pod's volumes. */}}
{{- define "activation-guard.sidecar.volumes" -}}
{{- $source := .Values.guard.saeSource -}}
- name: guard-socket
  emptyDir:
    sizeLimit: 1Mi
- name: guard-config
  configMap:
    name: {{ include "activation-guard.fullname" . }}
- name: guard-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.guard.server.tls.secretName }}
- name: guard-tls
  secret:
    secretName: {{ .Values.guard.server.tls.secretName }}
    defaultMode: 288  # 0440: read by root and the pod's fsGroup (the guard), nobody else
{{- end }}
{{- if eq $source.type "persistentVolumeClaim" }}
- name: guard-saes
  persistentVolumeClaim:
    claimName: {{ required "guard.saeSource.persistentVolumeClaim.claimName is required when guard.saeSource.type is persistentVolumeClaim" $source.persistentVolumeClaim.claimName }}
    readOnly: true
{{- else if eq $source.type "image" }}
- name: guard-saes
  image:
    reference: {{ required "guard.saeSource.image.reference is required when guard.saeSource.type is image" $source.image.reference | quote }}
    pullPolicy: {{ $source.image.pullPolicy }}
{{- else if eq $source.type "initContainer" }}
{{- $_ := required "guard.saeSource.initContainer.image.repository is required when guard.saeSource.type is initContainer" $source.initContainer.image.repository }}
- name: guard-saes
  emptyDir:
    sizeLimit: {{ $source.initContainer.sizeLimit }}
{{- end }}
{{- if .Values.sharedMemory.enabled }}
- name: guard-shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.sharedMemory.sizeLimit }}
{{- end }}
{{- end }}
