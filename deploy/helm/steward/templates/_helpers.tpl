{{- define "steward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "steward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "steward.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "steward.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "steward.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "steward.fullname" .)) -}}
{{- end -}}

{{- define "steward.databaseSecretName" -}}
{{- .Values.database.existingSecret | default (printf "%s-secrets" (include "steward.fullname" .)) -}}
{{- end -}}

{{/* Where each service listens, for the others and the gateway. */}}
{{- define "steward.serviceUrls" -}}
{{- $root := . -}}
{{- range $name, $svc := .Values.services }}
STEWARD_{{ upper $name }}_URL: {{ printf "http://%s-%s:%v" (include "steward.fullname" $root) $name $svc.port | quote }}
{{- end }}
{{- end -}}

{{/* The environment every Steward container gets: settings from the ConfigMap, secrets by key. */}}
{{- define "steward.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "steward.fullname" . }}-config
env:
  - name: STEWARD_DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "steward.databaseSecretName" . }}
        key: {{ .Values.database.existingSecretKey }}
  - name: STEWARD_API_KEY_PEPPER
    valueFrom:
      secretKeyRef:
        name: {{ include "steward.secretName" . }}
        key: api-key-pepper
  - name: STEWARD_UPSTREAM_CREDENTIAL_KEY
    valueFrom:
      secretKeyRef:
        name: {{ include "steward.secretName" . }}
        key: upstream-credential-key
{{- end -}}

{{- define "steward.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 2
  failureThreshold: 30
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* A fresh API key in Steward's format, for keys the operator did not provide. */}}
{{- define "steward.newKey" -}}stw_{{ randAlphaNum 8 }}_{{ randAlphaNum 32 }}{{- end -}}
