{{/* Names, labels and the checks that refuse unsafe value combinations. */}}

{{- define "eventrouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventrouter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventrouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eventrouter.labels" -}}
helm.sh/chart: {{ include "eventrouter.chart" . }}
{{ include "eventrouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: router
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "eventrouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eventrouter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.leaseName" -}}
{{- default (include "eventrouter.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "eventrouter.checkpointConfigMapName" -}}
{{- default (printf "%s-checkpoint" (include "eventrouter.fullname" .)) .Values.checkpoint.configMapName -}}
{{- end -}}

{{- define "eventrouter.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.values -}}
{{- printf "%s-credentials" (include "eventrouter.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.usesDataDir" -}}
{{- if eq .Values.checkpoint.mode "dataDir" -}}true{{- end -}}
{{- end -}}

{{/*
Refuse a credential written as a literal: option keys that name a secret must hold an
`env:NAME` or `file:/path` reference, so no secret ends up in the ConfigMap or the pod's args.
*/}}
{{- define "eventrouter.secretKeyPattern" -}}(?i)(password|passwd|token|secret|api_?key|access_?key|access_?key_?id|private_?key|^key|^sign|corpsecret)${{- end -}}

{{- define "eventrouter.checkSecretValue" -}}
{{- $where := index . 0 -}}
{{- $key := index . 1 -}}
{{- $value := index . 2 -}}
{{- if and (regexMatch (include "eventrouter.secretKeyPattern" dict) (toString $key)) (ne (toString $value) "") -}}
{{- if not (regexMatch "^(env:|file:)" (toString $value)) -}}
{{- fail (printf "%s: option %q looks like a credential; give it as env:VAR_NAME or file:/path and put the value in credentials.values or credentials.existingSecret" $where (toString $key)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.checkQuery" -}}
{{- $where := index . 0 -}}
{{- range $pair := splitList "&" (index . 1) -}}
{{- if contains "=" $pair -}}
{{- $kv := splitn "=" 2 $pair -}}
{{- include "eventrouter.checkSecretValue" (list $where $kv._0 $kv._1) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.validate" -}}
{{- $v := .Values -}}
{{- if and (gt (int $v.replicaCount) 1) (not $v.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 requires leaderElection.enabled=true: without it every replica delivers every event" -}}
{{- end -}}
{{- if gt (add (int $v.shutdownTimeout) 5) (int $v.terminationGracePeriodSeconds) -}}
{{- fail (printf "shutdownTimeout (%d) must be at least 5 s below terminationGracePeriodSeconds (%d): after the drain the router still writes its spools, the checkpoint and the lease release before the kubelet kills the pod" (int $v.shutdownTimeout) (int $v.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- if and $v.strategy (eq (toString $v.strategy.type) "RollingUpdate") (not $v.leaderElection.enabled) -}}
{{- fail "strategy RollingUpdate needs leaderElection.enabled=true: without it the old and the new pod would both deliver during the rollout" -}}
{{- end -}}
{{- if $v.leaderElection.enabled -}}
{{- if not (lt (float64 $v.leaderElection.renewDeadline) (float64 $v.leaderElection.leaseDuration)) -}}
{{- fail "leaderElection.renewDeadline must be below leaderElection.leaseDuration: a leader must stop before its lease can expire" -}}
{{- end -}}
{{- if not (lt (mulf 1.2 (float64 $v.leaderElection.retryPeriod)) (float64 $v.leaderElection.renewDeadline)) -}}
{{- fail "leaderElection.renewDeadline must be more than 1.2 × leaderElection.retryPeriod (as client-go requires): a leader needs room for a jittered retry before it stops" -}}
{{- end -}}
{{- end -}}
{{- if and $v.credentials.existingSecret $v.credentials.values -}}
{{- fail "set credentials.existingSecret or credentials.values, not both" -}}
{{- end -}}
{{- if and $v.credentials.env (not (include "eventrouter.credentialsSecretName" .)) -}}
{{- fail "credentials.env needs credentials.existingSecret or credentials.values" -}}
{{- end -}}
{{- if hasKey $v.config "namespaces" -}}
{{- fail "config.namespaces is not used: set watchNamespaces (it also scopes the RBAC)" -}}
{{- end -}}
{{- if hasKey $v.config "cluster_name" -}}
{{- fail "config.cluster_name is not used: set clusterName" -}}
{{- end -}}
{{- if hasKey $v.config "data_dir" -}}
{{- fail "config.data_dir is not used: set checkpoint.mode=dataDir and checkpoint.dataDir (the chart mounts the volume)" -}}
{{- end -}}
{{- if and (not $v.sinks.flags) (not $v.config.sinks) -}}
{{- fail "no sinks configured: set sinks.flags and/or config.sinks" -}}
{{- end -}}
{{- if and $v.persistence.enabled (ne $v.checkpoint.mode "dataDir") -}}
{{- fail "persistence.enabled needs checkpoint.mode=dataDir" -}}
{{- end -}}
{{- if and $v.persistence.enabled (gt (int $v.replicaCount) 1) (not (has "ReadWriteMany" $v.persistence.accessModes)) -}}
{{- fail "replicaCount > 1 cannot share a ReadWriteOnce volume: use checkpoint.mode=configMap, or a ReadWriteMany claim" -}}
{{- end -}}
{{- range $i, $sink := ($v.config.sinks | default list) -}}
{{- $where := printf "config.sinks[%d] (%s)" $i (toString (default $sink.type $sink.name)) -}}
{{- range $key, $value := $sink -}}
{{- include "eventrouter.checkSecretValue" (list $where $key $value) -}}
{{- if and (eq (toString $key) "url") (contains "?" (toString $value)) -}}
{{- include "eventrouter.checkQuery" (list $where (index (splitn "?" 2 (toString $value)) "_1")) -}}
{{- end -}}
{{- if and (has (toString $key) (list "headers" "header")) (kindIs "map" $value) -}}
{{- range $name, $header := $value -}}
{{- if not (regexMatch "^(env:|file:)" (toString $header)) -}}
{{- fail (printf "%s: header %q holds a literal value; give it as env:VAR_NAME or file:/path (headers carry credentials)" $where (toString $name)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $i, $flag := $v.sinks.flags -}}
{{- if contains "?" $flag -}}
{{- include "eventrouter.checkQuery" (list (printf "sinks.flags[%d]" $i) (index (splitn "?" 2 $flag) "_1")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
