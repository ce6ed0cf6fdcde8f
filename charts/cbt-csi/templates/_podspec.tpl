{{/*
The plugin pod: the driver (`cbt-csi serve --role all`) and its sidecars, talking over one unix
socket in kubelet's plugin directory, where kubelet finds it too. Used by the StatefulSet (mode single) and the DaemonSet (mode daemonset),
where the driver also has a peer listener for the other nodes' drivers.
*/}}
{{- define "cbt-csi.podTemplate" -}}
{{- $daemonset := eq .Values.mode "daemonset" -}}
metadata:
  labels:
    {{- include "cbt-csi.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or .Values.podAnnotations .Values.driver.faults }}
  annotations:
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with .Values.driver.faults }}
    # Changed fault rules restart the pod: the driver reads them at start-up.
    checksum/faults: {{ toYaml . | sha256sum }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ include "cbt-csi.fullname" . }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- if and (not $daemonset) .Values.single.nodeName }}
  nodeSelector:
    kubernetes.io/hostname: {{ .Values.single.nodeName }}
    {{- with .Values.nodeSelector }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- else }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Longer than the driver's drain timeout, so in-flight calls can finish before SIGKILL.
  terminationGracePeriodSeconds: {{ add (int .Values.driver.drainTimeoutSeconds) 5 }}
  containers:
    - name: cbt-csi
      image: {{ include "cbt-csi.driverImage" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --endpoint=unix:///csi/csi.sock
        - --node-id=$(NODE_NAME)
        - --driver-name={{ .Values.driverName }}
        - --role=all
        - --state-dir={{ .Values.driver.stateDir }}
        - --default-block-size={{ .Values.driver.defaultBlockSize }}
        - --metadata-style={{ .Values.driver.metadataStyle }}
        - --metadata-profile={{ .Values.driver.metadataProfile }}
        - --deleted-snapshot-retention={{ .Values.driver.deletedSnapshotRetentionDays }}
        - --deleted-snapshot-max={{ .Values.driver.deletedSnapshotMaxPerVolume }}
        - --default-max-results={{ .Values.driver.defaultMaxResults }}
        - --log-level={{ .Values.driver.logLevel }}
        - --drain-timeout={{ .Values.driver.drainTimeoutSeconds }}
        {{- with .Values.driver.adminEndpoint }}
        - --admin-endpoint={{ . }}
        {{- end }}
        {{- with .Values.driver.faults }}
        - --faults=/etc/cbt-csi/faults/faults.yaml
        {{- end }}
        {{- with .Values.driver.capacity }}
        - --capacity={{ . }}
        {{- end }}
        {{- if gt (int .Values.driver.maxVolumesPerNode) 0 }}
        - --max-volumes-per-node={{ .Values.driver.maxVolumesPerNode }}
        {{- end }}
        {{- if gt (int .Values.driver.metricsPort) 0 }}
        - --metrics-address=0.0.0.0:{{ .Values.driver.metricsPort }}
        {{- end }}
        {{- if $daemonset }}
        # Requests for volumes and snapshots of other nodes go to their driver: mutual TLS on the pod IP,
        # peers found by listing the plugin pods (docs/adr/0008).
        - --peer-listen=$(POD_IP):{{ .Values.peer.port }}
        - --peer-tls-cert=/etc/cbt-csi/peer-tls/tls.crt
        - --peer-tls-key=/etc/cbt-csi/peer-tls/tls.key
        - --peer-tls-ca=/etc/cbt-csi/peer-tls/ca.crt
        - --peer-discovery=kubernetes
        - --peer-pod-selector=app.kubernetes.io/name={{ .Chart.Name }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=plugin
        - --peer-namespace=$(POD_NAMESPACE)
        {{- end }}
      env:
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        {{- if $daemonset }}
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- end }}
      # Mounts, loop devices and the FUSE server need root and all devices.
      securityContext:
        privileged: true
      ports:
        - name: healthz
          containerPort: {{ .Values.sidecars.livenessProbe.httpPort }}
        {{- if gt (int .Values.driver.metricsPort) 0 }}
        - name: metrics
          containerPort: {{ .Values.driver.metricsPort }}
        {{- end }}
        {{- if $daemonset }}
        - name: peer
          containerPort: {{ .Values.peer.port }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: healthz
        initialDelaySeconds: 10
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 5
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
        # Staging and target paths are under kubelet's directory; mounts made here must reach the host.
        - name: kubelet-dir
          mountPath: {{ .Values.kubeletDir }}
          mountPropagation: Bidirectional
        # The store, and the FUSE mount (<stateDir>/fuse) the loop devices read through. Same path as
        # on the host, so a restarted plugin finds and cleans up what the last one left mounted.
        - name: state-dir
          mountPath: {{ .Values.driver.stateDir }}
          mountPropagation: Bidirectional
        # losetup needs /dev/loop-control and the loop device nodes the host creates.
        - name: dev-dir
          mountPath: /dev
        {{- if $daemonset }}
        - name: peer-tls
          mountPath: /etc/cbt-csi/peer-tls
          readOnly: true
        {{- end }}
        {{- if .Values.driver.faults }}
        - name: faults
          mountPath: /etc/cbt-csi/faults
          readOnly: true
        {{- end }}
      {{- with .Values.driver.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}

    - name: node-driver-registrar
      image: {{ include "cbt-csi.image" .Values.sidecars.nodeDriverRegistrar.image }}
      args:
        - --csi-address=/csi/csi.sock
        - --kubelet-registration-path={{ include "cbt-csi.pluginDir" . }}/csi.sock
        - --http-endpoint=:{{ .Values.sidecars.nodeDriverRegistrar.httpPort }}
      ports:
        - name: registrar
          containerPort: {{ .Values.sidecars.nodeDriverRegistrar.httpPort }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: registrar
        initialDelaySeconds: 5
        timeoutSeconds: 5
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
        - name: registration-dir
          mountPath: /registration
      {{- with .Values.sidecars.nodeDriverRegistrar.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}

    - name: liveness-probe
      image: {{ include "cbt-csi.image" .Values.sidecars.livenessProbe.image }}
      args:
        - --csi-address=/csi/csi.sock
        - --http-endpoint=:{{ .Values.sidecars.livenessProbe.httpPort }}
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
      {{- with .Values.sidecars.livenessProbe.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}

    - name: csi-provisioner
      image: {{ include "cbt-csi.image" .Values.sidecars.provisioner.image }}
      args:
        - --csi-address=/csi/csi.sock
        # Topology is GA in csi-provisioner v6 and always on; the driver reports topology.cbt.csi.dev/node.
        - --extra-create-metadata
        - --timeout={{ .Values.sidecars.provisioner.timeout }}
        - --default-fstype={{ .Values.sidecars.provisioner.defaultFsType }}
        {{- if .Values.volumeAttributesClass.create }}
        # A PVC's VolumeAttributesClass becomes CreateVolume's mutable_parameters.
        - --feature-gates=VolumeAttributesClass=true
        {{- end }}
        {{- if $daemonset }}
        # Each node's provisioner creates the volumes of claims scheduled to its node (NODE_NAME).
        - --node-deployment
        {{- end }}
      {{- if $daemonset }}
      env:
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
      {{- end }}
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
      {{- with .Values.sidecars.provisioner.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}

    - name: csi-snapshotter
      image: {{ include "cbt-csi.image" .Values.sidecars.snapshotter.image }}
      args:
        - --csi-address=/csi/csi.sock
        - --extra-create-metadata
        - --timeout={{ .Values.sidecars.snapshotter.timeout }}
        {{- if .Values.volumeGroupSnapshotClass.create }}
        # VolumeGroupSnapshot (GroupController). Needs the groupsnapshot.storage.k8s.io CRDs installed first:
        # with the gate on and the CRDs missing, the sidecar stops serving ordinary snapshots too.
        - --feature-gates=CSIVolumeGroupSnapshot=true
        {{- end }}
        {{- if $daemonset }}
        # Distributed snapshotting: also start the snapshot-controller with --enable-distributed-snapshotting.
        - --node-deployment
        {{- end }}
      {{- if $daemonset }}
      env:
        - name: NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
      {{- end }}
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
      {{- with .Values.sidecars.snapshotter.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}

    {{- if include "cbt-csi.resizerEnabled" . }}

    - name: csi-resizer
      image: {{ include "cbt-csi.image" .Values.sidecars.resizer.image }}
      args:
        - --csi-address=/csi/csi.sock
        # Given explicitly, --timeout is also the ControllerExpandVolume timeout (over --resize-timeout, v2.3.0).
        - --timeout={{ .Values.sidecars.resizer.timeout }}
        {{- if .Values.volumeAttributesClass.create }}
        # A PVC switching VolumeAttributesClass becomes a ControllerModifyVolume (the driver has MODIFY_VOLUME).
        - --feature-gates=VolumeAttributesClass=true
        {{- end }}
        {{- if $daemonset }}
        # One active resizer for the cluster; its driver forwards each expansion to the volume's node.
        - --leader-election
        - --leader-election-namespace=$(POD_NAMESPACE)
        {{- end }}
      {{- if $daemonset }}
      env:
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
      {{- end }}
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
      {{- with .Values.sidecars.resizer.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}

    {{- if include "cbt-csi.snapshotMetadataEnabled" . }}

    - name: csi-snapshot-metadata
      image: {{ include "cbt-csi.image" .Values.snapshotMetadata.image }}
      args:
        - --csi-address=/csi/csi.sock
        - --port={{ .Values.snapshotMetadata.grpcPort }}
        - --http-endpoint=:{{ .Values.snapshotMetadata.httpPort }}
        - --tls-cert=/tmp/certificates/tls.crt
        - --tls-key=/tmp/certificates/tls.key
        - --audience={{ include "cbt-csi.snapshotMetadataAudience" . }}
        - --max-streaming-duration-min={{ .Values.snapshotMetadata.maxStreamingDurationMinutes }}
      ports:
        - name: snapshot-meta
          containerPort: {{ .Values.snapshotMetadata.grpcPort }}
        - name: sm-http
          containerPort: {{ .Values.snapshotMetadata.httpPort }}
      readinessProbe:
        httpGet:
          path: /health
          port: sm-http
        periodSeconds: 10
      livenessProbe:
        httpGet:
          path: /health
          port: sm-http
        initialDelaySeconds: 10
        periodSeconds: 20
      volumeMounts:
        - name: socket-dir
          mountPath: /csi
        - name: snapshot-metadata-tls
          mountPath: /tmp/certificates
          readOnly: true
      {{- with .Values.snapshotMetadata.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}

  volumes:
    - name: socket-dir
      hostPath:
        path: {{ include "cbt-csi.pluginDir" . }}
        type: DirectoryOrCreate
    - name: registration-dir
      hostPath:
        path: {{ .Values.kubeletDir }}/plugins_registry
        type: Directory
    - name: kubelet-dir
      hostPath:
        path: {{ .Values.kubeletDir }}
        type: Directory
    - name: state-dir
      hostPath:
        path: {{ .Values.driver.stateDir }}
        type: DirectoryOrCreate
    - name: dev-dir
      hostPath:
        path: /dev
        type: Directory
    {{- if include "cbt-csi.snapshotMetadataEnabled" . }}
    - name: snapshot-metadata-tls
      secret:
        secretName: {{ include "cbt-csi.snapshotMetadataTLSSecret" . }}
    {{- end }}
    {{- if $daemonset }}
    - name: peer-tls
      secret:
        secretName: {{ include "cbt-csi.peerTLSSecret" . }}
        defaultMode: 0400
    {{- end }}
    {{- if .Values.driver.faults }}
    - name: faults
      configMap:
        name: {{ include "cbt-csi.fullname" . }}-faults
    {{- end }}
{{- end -}}
