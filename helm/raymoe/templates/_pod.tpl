{{/*
Pod template of one Ray node group (head, attention or expert).
Call with (dict "root" $ "group" .Values.<group> "component" "head|attention|expert").
The Ray container comes first: KubeRay treats containers[0] as the Ray container.
*/}}
{{- define "raymoe.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group }}
{{- $isHead := eq .component "head" }}
{{- $storage := $v.modelStorage }}
{{- $mountModel := and $g.mountModel (ne $storage.type "none") }}
{{- $resources := deepCopy ($g.resources | default dict) }}
{{- if and (not $isHead) (gt (int ($g.gpusPerNode | default 0)) 0) }}
{{- range $kind := list "limits" "requests" }}
{{- $m := get $resources $kind | default dict }}
{{- $_ := set $m "nvidia.com/gpu" (int $g.gpusPerNode) }}
{{- $_ := set $resources $kind $m }}
{{- end }}
{{- end }}
metadata:
  labels:
    {{- include "raymoe.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $g.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if and $mountModel (eq $storage.type "objectStorage") }}
  initContainers:
    # Copies the checkpoint from object storage onto the node's disk before Ray starts.
    - name: fetch-model
      image: {{ printf "%s:%s" $storage.objectStorage.image.repository ($storage.objectStorage.image.tag | toString) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        {{- toYaml $storage.objectStorage.command | nindent 8 }}
        - {{ required "modelStorage.objectStorage.uri is required when modelStorage.type is objectStorage (e.g. s3://bucket/Kimi-K2-Thinking)" $storage.objectStorage.uri | quote }}
        - {{ $storage.mountPath | quote }}
      env:
        # The copy tool writes its caches under HOME; the root filesystem is not ours to write.
        - name: HOME
          value: /tmp
        {{- with $storage.objectStorage.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $storage.objectStorage.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $storage.objectStorage.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: {{ $storage.mountPath }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $isHead }}
      image: {{ include "raymoe.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if $isHead }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        - name: as-metrics
          containerPort: 44217
        - name: dash-metrics
          containerPort: 44227
        {{- end }}
        - name: serve
          containerPort: {{ include "raymoe.servePort" $root }}
        - name: metrics
          containerPort: 8080
      env:
        - name: {{ include "raymoe.apiKeysEnv" $root }}
          valueFrom:
            secretKeyRef:
              name: {{ include "raymoe.apiKeysSecretName" $root }}
              key: {{ include "raymoe.apiKeysSecretKey" $root }}
        {{- with $v.commonEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- if $mountModel }}
        - name: model
          mountPath: {{ $storage.mountPath }}
          readOnly: {{ $storage.readOnly }}
        {{- end }}
  volumes:
    # Ray writes sessions and logs under /tmp/ray.
    - name: tmp
      emptyDir: {}
    # Ray's object store and NCCL live in shared memory; the container default (64 MiB) is too small.
    - name: shm
      emptyDir:
        medium: Memory
        {{- with $g.shmSize }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if $mountModel }}
    - name: model
      {{- if eq $storage.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ required "modelStorage.pvc.claimName is required when modelStorage.type is pvc: a (ReadOnlyMany) PVC holding the checkpoint" $storage.pvc.claimName }}
        readOnly: {{ $storage.readOnly }}
      {{- else if eq $storage.type "hostPath" }}
      hostPath:
        path: {{ required "modelStorage.hostPath.path is required when modelStorage.type is hostPath: the checkpoint folder on every node" $storage.hostPath.path }}
        type: {{ $storage.hostPath.type }}
      {{- else if eq $storage.type "objectStorage" }}
      {{- if $storage.objectStorage.sizeLimit }}
      emptyDir:
        sizeLimit: {{ $storage.objectStorage.sizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
      {{- else }}
      {{- fail (printf "modelStorage.type must be one of none, pvc, hostPath, objectStorage (got %q)" $storage.type) }}
      {{- end }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
