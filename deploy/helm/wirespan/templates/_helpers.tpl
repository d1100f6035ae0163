{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "wirespan.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wirespan.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wirespan.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wirespan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wirespan.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A telemetry address's port (host:port), for the container ports and the probes. */}}
{{- define "wirespan.healthPort" -}}
{{- .Values.config.service.telemetry.health.address | splitList ":" | last -}}
{{- end -}}
{{- define "wirespan.metricsPort" -}}
{{- .Values.config.service.telemetry.metrics.address | splitList ":" | last -}}
{{- end -}}
