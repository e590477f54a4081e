{{/* The chart name, or nameOverride. */}}
{{- define "podmeter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "podmeter.fullname" -}}
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

{{- define "podmeter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podmeter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "podmeter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "podmeter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: podmeter
{{- end }}

{{- define "podmeter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "podmeter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Relabelings shared by the ServiceMonitor and the PodMonitor: a fixed job
name the alert rules select on, and the node each target runs on (so that
`up` says which node lost its agent).
*/}}
{{- define "podmeter.targetRelabelings" -}}
- action: replace
  targetLabel: job
  replacement: podmeter
- action: replace
  sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
# One agent per node: the node, not the agent pod's address, names the
# target, so a restarted or upgraded agent (which continues its pinned
# counters) continues the very same series.
- action: replace
  sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: instance
{{- with .Values.monitor.relabelings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Scheme, TLS and credentials of a monitor's endpoint under metrics.auth:
each agent's certificate is self-signed (made at its start, no CA to
distribute), so Prometheus checks no chain, as kube-prometheus does for
node-exporter behind kube-rbac-proxy; the bearer token is what is verified.
*/}}
{{- define "podmeter.endpointAuth" -}}
{{- if eq .Values.metrics.auth "kubernetes" }}
scheme: https
tlsConfig:
  insecureSkipVerify: true
{{- end }}
{{- end }}

{{- define "podmeter.validate" -}}
{{- if not (has .Values.metrics.auth (list "kubernetes" "none")) }}
{{- fail (printf "metrics.auth must be \"kubernetes\" or \"none\", not %q" .Values.metrics.auth) }}
{{- end }}
{{- if not (has .Values.securityMode (list "privileged" "capabilities")) }}
{{- fail (printf "securityMode must be \"privileged\" or \"capabilities\", not %q" .Values.securityMode) }}
{{- end }}
{{- if not (has .Values.monitor.kind (list "auto" "ServiceMonitor" "PodMonitor" "none")) }}
{{- fail (printf "monitor.kind must be auto, ServiceMonitor, PodMonitor or none, not %q" .Values.monitor.kind) }}
{{- end }}
{{- if not (has (toString .Values.prometheusRule.enabled) (list "auto" "true" "false")) }}
{{- fail (printf "prometheusRule.enabled must be auto, true or false, not %q" (toString .Values.prometheusRule.enabled)) }}
{{- end }}
{{- if and (eq .Values.monitor.kind "ServiceMonitor") (not .Values.service.enabled) }}
{{- fail "monitor.kind=ServiceMonitor needs service.enabled=true (or use monitor.kind=PodMonitor)" }}
{{- end }}
{{- if or (lt (int .Values.agent.maxCgroups) 16) (gt (int .Values.agent.maxCgroups) 1048576) }}
{{- fail "agent.maxCgroups must be between 16 and 1048576 (the agent's --max-cgroups range)" }}
{{- end }}
{{- end }}

{{/*
The monitor in effect: monitor.kind, or for "auto" what the cluster serves
(.Capabilities, from the API server at install; `helm template` needs
--api-versions): a ServiceMonitor through the Service, else a PodMonitor,
else none. Explicit kinds are rendered whatever the cluster serves.
*/}}
{{- define "podmeter.monitorKind" -}}
{{- if ne .Values.monitor.kind "auto" }}
{{- .Values.monitor.kind }}
{{- else if and .Values.service.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") }}
{{- "ServiceMonitor" }}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PodMonitor" }}
{{- "PodMonitor" }}
{{- else }}
{{- "none" }}
{{- end }}
{{- end }}

{{/* "true" when the PrometheusRule is rendered: enabled, or auto and served. */}}
{{- define "podmeter.prometheusRule" -}}
{{- $e := toString .Values.prometheusRule.enabled }}
{{- if or (eq $e "true") (and (eq $e "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule")) }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* "true" when the pods carry prometheus.io/* scrape annotations. */}}
{{- define "podmeter.scrapeAnnotations" -}}
{{- if and .Values.monitor.scrapeAnnotations (eq (include "podmeter.monitorKind" .) "none") }}
{{- "true" }}
{{- end }}
{{- end }}

{{/*
"true" when `helm test` has its probe (with the chart's RBAC): unless
test.enabled is false. A missing key counts as on: `helm upgrade
--reuse-values` from a chart without these values renders with the old
chart's defaults, and the upgraded release should still test itself.
*/}}
{{- define "podmeter.testEnabled" -}}
{{- $test := .Values.test | default dict }}
{{- if and (or (not (hasKey $test "enabled")) $test.enabled) .Values.rbac.create }}
{{- "true" }}
{{- end }}
{{- end }}
