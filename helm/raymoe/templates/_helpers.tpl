{{/*
Names, labels and small value lookups shared by every template.
Kubernetes names are DNS labels (63 characters at most); the RayService name is shorter still
(47), because KubeRay appends "-xxxxx" to make the RayCluster name and then "-serve-svc" to make
Service names (ray-operator utils.MaxRayServiceNameLength).
*/}}

{{- define "raymoe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "raymoe.fullname" -}}
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

{{/* RayService name: fullname cut to KubeRay's 47-character limit. */}}
{{- define "raymoe.rayServiceName" -}}
{{- include "raymoe.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/* "<fullname>-<suffix>" within 63 characters; call with (list $ "suffix"). */}}
{{- define "raymoe.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "raymoe.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "raymoe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The one labels helper: every object carries these. */}}
{{- define "raymoe.labels" -}}
helm.sh/chart: {{ include "raymoe.chart" . }}
{{ include "raymoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Stable subset used in selectors (Service, PodMonitor, NetworkPolicy); never changes on upgrade. */}}
{{- define "raymoe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raymoe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "raymoe.image" -}}
{{- $repo := required "image.repository is required: an image with Ray and raymoe installed (e.g. ghcr.io/raymoe/raymoe)" .Values.image.repository }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* HTTP port of the Serve proxies: the raymoe tree owns it (serve.port), default 8000. */}}
{{- define "raymoe.servePort" -}}
{{- dig "serve" "port" 8000 (.Values.raymoe | default dict) | int }}
{{- end }}

{{/* Env var the ingress reads extra API keys from (serve.api_keys_env). */}}
{{- define "raymoe.apiKeysEnv" -}}
{{- dig "serve" "api_keys_env" "RAYMOE_API_KEYS" (.Values.raymoe | default dict) }}
{{- end }}

{{- define "raymoe.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (include "raymoe.componentName" (list . "api-keys")) }}
{{- end }}

{{- define "raymoe.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}api-keys{{ end }}
{{- end }}

{{/*
rayStartParams: every value a string (the CRD type is map[string]string). Custom Ray resources
go in as `resources: '"{\"expert\":8}"'`: KubeRay pastes the value after `--resources=` in a shell
command, so the JSON needs its own quotes.
Call with (dict "params" map "resources" map).
*/}}
{{- define "raymoe.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := .params }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- if .resources }}
{{- $_ := set $params "resources" (printf "\"%s\"" (toJson .resources | replace "\"" "\\\"")) }}
{{- end }}
{{- if $params }}
{{- toYaml $params }}
{{- else }}
{}
{{- end }}
{{- end }}
