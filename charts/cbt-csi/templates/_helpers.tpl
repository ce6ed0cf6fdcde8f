{{/* Release-scoped name for namespaced and cluster-wide objects. */}}
{{- define "cbt-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cbt-csi.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "cbt-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: plugin
{{- end -}}

{{/* repository:tag of an image value with `repository` and `tag`. */}}
{{- define "cbt-csi.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "cbt-csi.driverImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The plugin's socket as kubelet sees it on the host. */}}
{{- define "cbt-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir .Values.driverName -}}
{{- end -}}

{{/* Whether the resizer runs (in mode daemonset the drivers forward ControllerExpandVolume to the owner). */}}
{{- define "cbt-csi.resizerEnabled" -}}
{{- if .Values.sidecars.resizer.enabled -}}true{{- end -}}
{{- end -}}

{{/* Whether csi-snapshot-metadata runs (in mode daemonset the drivers forward to the snapshot's node). */}}
{{- define "cbt-csi.snapshotMetadataEnabled" -}}
{{- if .Values.snapshotMetadata.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Secret with the peer certificate, its key and the peer CA (mode daemonset). */}}
{{- define "cbt-csi.peerTLSSecret" -}}
{{- if eq .Values.peer.tls.mode "secret" -}}
{{- required "peer.tls.existingSecret is required when peer.tls.mode is secret" .Values.peer.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-peer-tls" (include "cbt-csi.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "cbt-csi.snapshotMetadataService" -}}
{{- printf "%s-snapshot-metadata" (include "cbt-csi.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The audience backup clients' tokens must name. The one source of both the SnapshotMetadataService's
spec.audience (which csi-snapshot-metadata v1.1.0 authenticates against) and the sidecar's --audience.
*/}}
{{- define "cbt-csi.snapshotMetadataAudience" -}}
{{- .Values.snapshotMetadata.audience -}}
{{- end -}}

{{- define "cbt-csi.snapshotMetadataTLSSecret" -}}
{{- if eq .Values.snapshotMetadata.tls.mode "secret" -}}
{{- required "snapshotMetadata.tls.existingSecret is required when tls.mode is secret" .Values.snapshotMetadata.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-snapshot-metadata-tls" (include "cbt-csi.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "cbt-csi.storageClassBindingMode" -}}
{{- if .Values.storageClass.volumeBindingMode -}}
{{- .Values.storageClass.volumeBindingMode -}}
{{- else if eq .Values.mode "daemonset" -}}
WaitForFirstConsumer
{{- else -}}
Immediate
{{- end -}}
{{- end -}}
