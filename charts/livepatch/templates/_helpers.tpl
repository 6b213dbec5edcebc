{{/* Chart name, truncated to 63 characters (a label value). */}}
{{- define "livepatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name; the components append -operator / -agent (9 characters). */}}
{{- define "livepatch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "livepatch.operator.fullname" -}}{{ include "livepatch.fullname" . }}-operator{{- end -}}
{{- define "livepatch.agent.fullname" -}}{{ include "livepatch.fullname" . }}-agent{{- end -}}

{{- define "livepatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "livepatch.labels" -}}
helm.sh/chart: {{ include "livepatch.chart" . }}
app.kubernetes.io/name: {{ include "livepatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: livepatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "livepatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "livepatch.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "livepatch.componentLabels" -}}
{{ include "livepatch.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "livepatch.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "livepatch.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "livepatch.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "livepatch.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a component: (dict "ctx" $ "image" .Values.operator.image). A component's
own repository comes with its own tag/digest; otherwise the global image, whose tag/digest a
component may override. */}}
{{- define "livepatch.image" -}}
{{- $g := .ctx.Values.image -}}
{{- $repo := $g.repository -}}
{{- $tag := default .ctx.Chart.AppVersion $g.tag -}}
{{- $digest := $g.digest -}}
{{- if .image.repository -}}
{{- $repo = .image.repository -}}
{{- $tag = default .ctx.Chart.AppVersion .image.tag -}}
{{- $digest = .image.digest -}}
{{- else -}}
{{- if .image.tag -}}{{- $tag = .image.tag -}}{{- $digest = "" -}}{{- end -}}
{{- if .image.digest -}}{{- $digest = .image.digest -}}{{- end -}}
{{- end -}}
{{- if $digest -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{- define "livepatch.trustedKeysConfigMap" -}}{{ include "livepatch.fullname" . }}-trusted-keys{{- end -}}

{{/* Fail early on combinations that cannot work. */}}
{{- define "livepatch.validate" -}}
{{- if and .Values.operator.enabled (not .Values.operator.leaderElection.enabled) (gt (int .Values.operator.replicas) 1) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: without a Lease every replica would reconcile" -}}
{{- end -}}
{{- if and .Values.agent.signatures.enforce (not .Values.agent.signatures.trustedKeys) -}}
{{- fail "agent.signatures.enforce needs at least one key in agent.signatures.trustedKeys" -}}
{{- end -}}
{{- if and .Values.agent.enabled .Values.podSecurity.checkNamespace -}}
{{- $ns := lookup "v1" "Namespace" "" .Release.Namespace -}}
{{- if $ns -}}
{{- $labels := default dict $ns.metadata.labels -}}
{{- $enforce := get $labels "pod-security.kubernetes.io/enforce" -}}
{{- if and $enforce (ne $enforce "privileged") -}}
{{- fail (printf "namespace %s enforces Pod Security level %q, which rejects the livepatch agent (hostPID, CAP_SYS_PTRACE). Run: kubectl label namespace %s pod-security.kubernetes.io/enforce=privileged --overwrite (or set podSecurity.checkNamespace=false)" .Release.Namespace $enforce .Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The agent's command-line flags (node-agent --help; docs/agent.md). */}}
{{- define "livepatch.agent.args" -}}
{{- $ag := .Values.agent -}}
- --metrics-addr=0.0.0.0:{{ $ag.metrics.port }}
- --log-format={{ .Values.logFormat }}
- --resync-seconds={{ $ag.resyncSeconds }}
{{- with $ag.maxParallelTasks }}
- --max-parallel-tasks={{ . }}
{{- end }}
{{- with $ag.maxParallelProcesses }}
- --max-parallel-processes={{ . }}
{{- end }}
{{- with $ag.maxAttempts }}
- --max-attempts={{ . }}
{{- end }}
{{- with $ag.retrySeconds }}
- --retry-seconds={{ . }}
{{- end }}
{{- with $ag.bundleMaxBytes }}
- --bundle-max-bytes={{ . | int64 }}
{{- end }}
{{- if $ag.bundleCA.configMapName }}
- --bundle-ca-file=/etc/livepatch/bundle-ca/ca.crt
{{- end }}
{{- /* Bundle signatures: flags, not environment variables, so that an agent without
signature support refuses to start instead of silently accepting unsigned bundles. */}}
{{- if $ag.signatures.trustedKeys }}
- --trusted-keys-dir=/etc/livepatch/trusted-keys
{{- end }}
{{- if $ag.signatures.enforce }}
- --require-signature
{{- end }}
{{- end -}}

{{/* The operator's namespaced rules: cluster-wide, or a Role in the watched namespace (docs/operator.md). */}}
{{- define "livepatch.operator.namespacedRules" }}
  # Watch LivePatches; add and remove the livepatch.dev/revert finalizer (JSON patch).
  - apiGroups: ["livepatch.dev"]
    resources: ["livepatches"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["livepatch.dev"]
    resources: ["livepatches/status"]
    verbs: ["patch"]
  # Owner references with blockOwnerDeletion on the tasks.
  - apiGroups: ["livepatch.dev"]
    resources: ["livepatches/finalizers"]
    verbs: ["update"]
  # One task per target pod (server-side apply), deleted when the pod is gone.
  - apiGroups: ["livepatch.dev"]
    resources: ["livepatchtasks"]
    verbs: ["get", "list", "watch", "create", "patch", "delete"]
  # Targets and their container ids.
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  # Events on the LivePatches.
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
{{- end }}
