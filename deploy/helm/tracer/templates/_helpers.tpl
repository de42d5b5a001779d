{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "tracer.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "tracer.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels that select the pods; never change them on upgrade (the selector is immutable). */}}
{{- define "tracer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tracer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tracer.labels" -}}
{{ include "tracer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tracer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "tracer.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{- define "tracer.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* OTEL_EXPORTER_OTLP_HEADERS from otlp.headers: key=value pairs joined by commas, keys sorted. */}}
{{- define "tracer.otlpHeaders" -}}
{{- $pairs := list }}
{{- range $k, $v := .Values.otlp.headers }}
{{- $pairs = append $pairs (printf "%s=%v" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Kubernetes refuses allowPrivilegeEscalation: false together with privileged or SYS_ADMIN. */}}
{{- define "tracer.allowPrivilegeEscalation" -}}
{{- if or .Values.privileged (has "SYS_ADMIN" .Values.capabilities) (has "CAP_SYS_ADMIN" .Values.capabilities) }}true{{ else }}false{{ end }}
{{- end }}

{{/* Whether this cluster has the securityContext.appArmorProfile field (Kubernetes >= 1.30). */}}
{{- define "tracer.appArmorField" -}}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}true{{ end }}
{{- end }}

{{/* The beta annotation value equivalent to .Values.appArmorProfile, for clusters before 1.30. */}}
{{- define "tracer.appArmorAnnotation" -}}
{{- $p := .Values.appArmorProfile }}
{{- if eq $p.type "Unconfined" }}unconfined
{{- else if eq $p.type "RuntimeDefault" }}runtime/default
{{- else if eq $p.type "Localhost" }}localhost/{{ required "appArmorProfile.localhostProfile is required for type Localhost" $p.localhostProfile }}
{{- else }}{{ fail (printf "appArmorProfile.type %q is not Unconfined, RuntimeDefault or Localhost" $p.type) }}
{{- end }}
{{- end }}
