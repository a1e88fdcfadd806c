{{/*
Names, labels and small values shared by the chart's templates. Every define takes the chart's
root context: `.` inside this chart, `.Subcharts.<alias>` from a parent chart.
*/}}

{{/* activation-guard.name is the chart name, or nameOverride. */}}
{{- define "activation-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* activation-guard.fullname is "<release>-<name>" (the release alone when it contains the name), at most 63 characters. */}}
{{- define "activation-guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* activation-guard.chart is "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "activation-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* activation-guard.selectorLabels are the labels that select the example's pods. */}}
{{- define "activation-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "activation-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* activation-guard.labels are the standard labels of every resource. */}}
{{- define "activation-guard.labels" -}}
helm.sh/chart: {{ include "activation-guard.chart" . }}
{{ include "activation-guard.selectorLabels" . }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: activation-guard
{{- end }}

{{/* activation-guard.nativeSidecar is "true" when the guard runs as a native sidecar, else empty. */}}
{{- define "activation-guard.nativeSidecar" -}}
{{- $mode := .Values.guard.nativeSidecar }}
{{- if eq $mode "always" }}true
{{- else if and (eq $mode "auto") (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version) }}true
{{- end }}
{{- end }}

{{/* activation-guard.image is the guard image reference. */}}
{{- define "activation-guard.image" -}}
{{- $tag := .Values.guard.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-gpu" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.guard.image.repository $tag }}
{{- end }}

{{/* activation-guard.configPath is where the guard reads its config file. */}}
{{- define "activation-guard.configPath" -}}
/etc/guard/guard.yaml
{{- end }}

{{/* activation-guard.saePath is one SAE's path as the guard sees it (relative paths are under saeSource.mountPath). Takes (list $root $path). */}}
{{- define "activation-guard.saePath" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- if isAbs $path }}
{{- clean $path }}
{{- else }}
{{- clean (printf "%s/%s" $root.Values.guard.saeSource.mountPath $path) }}
{{- end }}
{{- end }}

{{/*
activation-guard.config is the guard's config file (guard.yaml), built from values. Only keys
that `guard config check` knows are written: the guard rejects unknown keys.
*/}}
{{- define "activation-guard.config" -}}
{{- $guard := .Values.guard }}
{{- $server := dict
  "listen" (include "activation-guard.sidecar.socketAddress" .)
  "health_listen" (printf "0.0.0.0:%d" (int $guard.healthPort))
  "drain_grace_seconds" $guard.server.drainGraceSeconds
  "max_message_bytes" (int64 $guard.server.maxMessageBytes)
  "max_concurrent_rpcs" (int64 $guard.server.maxConcurrentRpcs)
  "reflection" $guard.server.reflection
  "socket_mode" (toString $guard.server.socketMode) }}
{{- if $guard.server.tcp.enabled }}
{{- $_ := set $server "tcp_listen" (printf "0.0.0.0:%d" (int $guard.server.tcp.port)) }}
{{- end }}
{{- with $guard.server.tls }}
{{- if .secretName }}
{{- if not $guard.server.tcp.enabled }}
{{- fail "guard.server.tls.secretName needs guard.server.tcp.enabled: TLS secures the TCP listener only (the Unix socket stays in the pod)" }}
{{- end }}
{{- $tls := dict "cert_file" "/etc/guard-tls/tls.crt" "key_file" "/etc/guard-tls/tls.key" }}
{{- if .mutual }}
{{- $_ := set $tls "client_ca_file" "/etc/guard-tls/ca.crt" }}
{{- end }}
{{- $_ := set $server "tls" $tls }}
{{- else if .mutual }}
{{- fail "guard.server.tls.mutual needs guard.server.tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- end }}
{{- with .Values.sharedMemory }}
{{- if .enabled }}
{{- $_ := set $server "shared_memory" (dict "enabled" true "allowed_dirs" (list .mountPath) "allowed_uids" (.allowedUids | default list) "doorbell" (ne .doorbell false)) }}
{{- end }}
{{- end }}
{{- $saes := list }}
{{- range $name, $sae := $guard.saes }}
{{- $entry := dict "path" (include "activation-guard.saePath" (list $ $sae.path)) }}
{{- range $key := list "hook" "sha256" "dtype" "features" }}
{{- if hasKey $sae $key }}
{{- $_ := set $entry $key (get $sae $key) }}
{{- end }}
{{- end }}
{{- $saes = append $saes $entry }}
{{- end }}
{{- $telemetry := dict "tracing" $guard.telemetry.tracing "record_sensitive" $guard.telemetry.recordSensitive }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $telemetry "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) }}
{{- end }}
{{- /* Sections one by one, in the order of the guard's docs (toYaml alone would sort them). */ -}}
# Rendered by the activation-guard chart from its values; `guard config check` validates it.
server:
  {{- toYaml $server | nindent 2 }}
logging:
  {{- toYaml (dict "level" $guard.logging.level "format" $guard.logging.format) | nindent 2 }}
saes:
{{- if $saes }}
  {{- toYaml $saes | nindent 2 }}
{{- else }} []
{{- end }}
plugins:
{{- if $guard.plugins }}
  {{- toYaml $guard.plugins | nindent 2 }}
{{- else }} {}
{{- end }}
telemetry:
  {{- toYaml $telemetry | nindent 2 }}
{{- end }}

{{/* activation-guard.otelEnv is the OTEL_* environment of one container. Takes (dict "root" $ "service" NAME "container" NAME). */}}
{{- define "activation-guard.otelEnv" -}}
{{- $otel := .root.Values.otel }}
{{- $attributes := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" (printf "k8s.container.name=%s" .container) }}
{{- range $key, $value := $otel.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key (toString $value)) }}
{{- end -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- with $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otel.protocol | quote }}
{{- end }}
{{- with $otel.tracesSampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with $otel.tracesSamplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* activation-guard.otelServiceName is OTEL_SERVICE_NAME of the guard. */}}
{{- define "activation-guard.otelServiceName" -}}
{{- .Values.otel.serviceName | default (include "activation-guard.fullname" .) }}
{{- end }}

{{/* activation-guard.imagePullSecrets renders imagePullSecrets from the list of names. */}}
{{- define "activation-guard.imagePullSecrets" -}}
{{- range .Values.imagePullSecrets }}
- name: {{ . | quote }}
{{- end }}
{{- end }}

{{/* activation-guard.example.hostCheck is how the probes check the example host (given
example.host): GET healthPath when set (vLLM's /health), else a TCP connect to its port. */}}
{{- define "activation-guard.example.hostCheck" -}}
{{- if .healthPath -}}
httpGet:
  path: {{ .healthPath }}
  port: http
{{- else -}}
tcpSocket:
  port: http
{{- end }}
{{- end }}
