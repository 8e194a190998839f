{{/*
Cross-value checks that a JSON schema cannot express. Each one fails the render with the values
involved, so a bad combination stops at `helm install` instead of at the first request.
*/}}
{{- define "raymoe.validate" -}}
{{- $v := .Values }}
{{- $cfg := $v.raymoe | default dict }}
{{- $modelPath := dig "model" "path" "" $cfg | toString }}
{{- if ne $v.modelStorage.type "none" }}
{{- if not $modelPath }}
{{- fail (printf "raymoe.model.path is required when modelStorage.type is %s: the checkpoint folder under modelStorage.mountPath (%s)" $v.modelStorage.type $v.modelStorage.mountPath) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $v.modelStorage.mountPath)) (printf "%s/" $modelPath)) }}
{{- fail (printf "raymoe.model.path (%s) must lie under modelStorage.mountPath (%s)" $modelPath $v.modelStorage.mountPath) }}
{{- end }}
{{- end }}
{{- with dig "serve" "api_keys" list $cfg }}
{{- fail "raymoe.serve.api_keys would be readable by anyone who can read the RayService: put keys in apiKeys.keys or apiKeys.existingSecret (they reach the pods through a Secret)" }}
{{- end }}
{{- range $name := list "attentionWorkers" "expertWorkers" }}
{{- $g := index $v $name }}
{{- if and $g.enabled (or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "%s: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" $name (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- $numShards := dig "parallel" "num_expert_shards" 0 $cfg | int }}
{{- if and $v.expertWorkers.enabled (gt $numShards 0) }}
{{- $slots := mul (int $v.expertWorkers.maxReplicas) (int $v.expertWorkers.shardsPerNode) }}
{{- if lt $slots $numShards }}
{{- fail (printf "expertWorkers.maxReplicas (%d) x expertWorkers.shardsPerNode (%d) = %d expert slots < raymoe.parallel.num_expert_shards (%d): the shards could never all be placed" (int $v.expertWorkers.maxReplicas) (int $v.expertWorkers.shardsPerNode) $slots $numShards) }}
{{- end }}
{{- end }}
{{- $attnGpus := dig "serve" "attention" "num_gpus" 0 $cfg | float64 }}
{{- if and $v.attentionWorkers.enabled (gt $attnGpus 0.0) }}
{{- $maxAttn := dig "serve" "attention" "autoscaling" "max_replicas" 1 $cfg | float64 }}
{{- $have := mul (int $v.attentionWorkers.maxReplicas) (int $v.attentionWorkers.gpusPerNode) }}
{{- if gt (mulf $maxAttn $attnGpus) (float64 $have) }}
{{- fail (printf "raymoe.serve.attention asks for up to %v GPUs (max_replicas %v x num_gpus %v) but attentionWorkers offers %d (maxReplicas %d x gpusPerNode %d)" (mulf $maxAttn $attnGpus) $maxAttn $attnGpus $have (int $v.attentionWorkers.maxReplicas) (int $v.attentionWorkers.gpusPerNode)) }}
{{- end }}
{{- end }}
{{- end }}
