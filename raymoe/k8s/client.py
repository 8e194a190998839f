"""Apply, inspect and delete raymoe objects through the `kubernetes` Python client.

Apply is create-or-patch: GET the object; create it when absent, else send a JSON merge patch of
the rendered body (lists such as workerGroupSpecs are replaced whole, so a patch equals the render
for every field the chart sets). Every API failure becomes a `K8sError` with one line saying what
to do: 404 on the resource itself means the CRD (KubeRay, prometheus-operator) is not installed,
403 names the RBAC verb, 409 means another writer got there first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT_S = 30


class K8sError(RuntimeError):
    """A Kubernetes call failed; the message is one line meant for the user."""


@dataclass(frozen=True)
class Resource:
    group: str  # "" = core
    version: str
    plural: str
    kind: str
    hint: str = ""  # what to install when the API is missing

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def fqn(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


RAYSERVICE = Resource(
    "ray.io",
    "v1",
    "rayservices",
    "RayService",
    "install the KubeRay operator and its CRDs (helm install kuberay-operator kuberay/kuberay-operator)",
)
RESOURCES = {
    r.kind: r
    for r in (
        RAYSERVICE,
        Resource(
            "monitoring.coreos.com",
            "v1",
            "podmonitors",
            "PodMonitor",
            "install the prometheus-operator CRDs, or render with monitoring.podMonitors.enabled=false",
        ),
        Resource("", "v1", "services", "Service"),
        Resource("", "v1", "secrets", "Secret"),
        Resource("", "v1", "configmaps", "ConfigMap"),
        Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
    )
}


def resource_for(doc: Mapping[str, Any]) -> Resource:
    res = RESOURCES.get(doc.get("kind", ""))
    if res is None or res.api_version != doc.get("apiVersion"):
        raise K8sError(
            f"cannot apply {doc.get('apiVersion')} {doc.get('kind')}: raymoe k8s handles "
            f"{', '.join(sorted(RESOURCES))}; use kubectl for the rest"
        )
    return res


def connect(kubeconfig: str | None = None, context: str | None = None) -> tuple[Any, str]:
    """An ApiClient from the kubeconfig (or the in-cluster service account) and its default namespace."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    namespace = "default"
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen or {}).get("context", {}).get("namespace") or namespace
    except (ConfigException, OSError) as e:
        if kubeconfig or context:
            raise K8sError(f"cannot load kubeconfig {kubeconfig or '~/.kube/config'}: {_one_line(e)}") from e
        try:
            config.load_incluster_config(client_configuration=cfg)
        except ConfigException as e2:
            raise K8sError(f"no Kubernetes credentials: no kubeconfig ({_one_line(e)}) and not in a pod") from e2
    cfg.retries = 0  # connection errors surface at once instead of after urllib3's backoff
    return client.ApiClient(cfg), namespace


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _status_body(e: Any) -> dict[str, Any]:
    try:
        body = json.loads(e.body) if e.body else {}
    except (TypeError, ValueError):
        return {"message": _one_line(e.body or e.reason or "")}
    return body if isinstance(body, dict) else {}


class KubeClient:
    """The few calls raymoe needs, for the kinds in `RESOURCES`."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._net = client.NetworkingV1Api(api_client)

    # --------------------------------------------------------------- raw verbs
    def _ops(self, res: Resource) -> dict[str, Callable[..., Any]]:
        # Only a custom object's GET body is used; other responses stay raw (drained, not decoded), so
        # a DELETE answering with a Status or with the deleted object both work on every client version.
        get_kw = {"_request_timeout": TIMEOUT_S}
        kw = {**get_kw, "_preload_content": False}
        if res.kind in ("RayService", "PodMonitor"):
            gvp = (res.group, res.version)
            c = self._custom
            return {
                "get": lambda ns, n: c.get_namespaced_custom_object(*gvp, ns, res.plural, n, **get_kw),
                "create": lambda ns, b: c.create_namespaced_custom_object(*gvp, ns, res.plural, b, **kw),
                "patch": lambda ns, n, b: c.patch_namespaced_custom_object(*gvp, ns, res.plural, n, b, **kw),
                "delete": lambda ns, n: c.delete_namespaced_custom_object(*gvp, ns, res.plural, n, **kw),
            }
        api, suffix = {
            "Service": (self._core, "service"),
            "Secret": (self._core, "secret"),
            "ConfigMap": (self._core, "config_map"),
            "NetworkPolicy": (self._net, "network_policy"),
        }[res.kind]
        return {
            "get": lambda ns, n: getattr(api, f"read_namespaced_{suffix}")(n, ns, **kw),
            "create": lambda ns, b: getattr(api, f"create_namespaced_{suffix}")(ns, b, **kw),
            # Core PATCH defaults to JSON-patch in recent clients; a dict body is a merge patch.
            "patch": lambda ns, n, b: getattr(api, f"patch_namespaced_{suffix}")(
                n, ns, b, _content_type=MERGE_PATCH, **kw
            ),
            "delete": lambda ns, n: getattr(api, f"delete_namespaced_{suffix}")(n, ns, **kw),
        }

    def _call(self, res: Resource, verb: str, namespace: str, name: str, *args: Any) -> Any:
        """Run one verb; returns None for a missing object on get/delete, raises K8sError otherwise."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            result = self._ops(res)[verb](namespace, *args)
            if callable(getattr(result, "read", None)):  # raw response: read it so the connection is reused
                result.read()
            return result
        except ApiException as e:
            body = _status_body(e)
            message = _one_line(body.get("message") or e.reason or "")
            where = f"{res.kind} {namespace}/{name}"
            if e.status == 404:
                if (body.get("details") or {}).get("name"):  # the API exists, an object does not
                    if verb in ("get", "delete"):
                        return None
                    raise K8sError(f"{verb} {where}: not found (404): {message}") from e
                raise K8sError(
                    f"{res.kind} API {res.api_version} is not served by this cluster "
                    f"(404 on {res.fqn}): {res.hint or message}"
                ) from e
            if e.status == 403:
                raise K8sError(
                    f"forbidden (403): {message or 'access denied'}; your credentials need '{verb}' "
                    f"on {res.fqn} in namespace {namespace} (check RBAC)"
                ) from e
            if e.status == 409:
                raise K8sError(
                    f"conflict (409) on {where}: {message or 'conflict'}; another writer changed it "
                    f"or it is being deleted, re-run when it settles"
                ) from e
            if e.status == 401:
                raise K8sError(f"unauthorized (401): the cluster rejected the credentials: {message}") from e
            raise K8sError(f"{verb} {where} failed ({e.status}): {message}") from e
        except HTTPError as e:
            host = self.api_client.configuration.host
            raise K8sError(f"cannot reach the Kubernetes API at {host}: {_one_line(e)}") from e

    # ------------------------------------------------------------- operations
    def apply(self, doc: Mapping[str, Any], namespace: str) -> str:
        """Create or merge-patch one object; returns "created" or "configured"."""
        res = resource_for(doc)
        name = doc["metadata"]["name"]
        ns = doc["metadata"].get("namespace") or namespace
        body = json.loads(json.dumps(doc))  # plain JSON types, a private copy
        body["metadata"]["namespace"] = ns
        body["metadata"].pop("resourceVersion", None)
        if self._call(res, "get", ns, name, name) is None:
            self._call(res, "create", ns, name, body)
            return "created"
        self._call(res, "patch", ns, name, name, body)
        return "configured"

    def delete(self, kind: str, name: str, namespace: str) -> bool:
        """Delete one object; False when it was already gone."""
        if kind not in RESOURCES:
            raise K8sError(f"cannot delete {kind} {name}: raymoe k8s handles {', '.join(sorted(RESOURCES))}")
        return self._call(RESOURCES[kind], "delete", namespace, name, name) is not None

    def get_rayservice(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self._call(RAYSERVICE, "get", namespace, name, name)


# ------------------------------------------------------------------ status
def summarize(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a RayService an operator looks at: readiness, Serve apps, worker groups, replicas."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    cluster = active.get("rayClusterStatus") or {}
    groups = (spec.get("rayClusterConfig") or {}).get("workerGroupSpecs") or []
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "ready": ready.get("status") == "True",
        "reason": ready.get("reason") or status.get("serviceStatus") or "Pending",
        "upgrading": bool(pending.get("rayClusterName")),
        "cluster": active.get("rayClusterName"),
        "cluster_state": cluster.get("state"),
        "ready_workers": cluster.get("readyWorkerReplicas", 0),
        "desired_workers": cluster.get("desiredWorkerReplicas", 0),
        "worker_groups": [
            {
                "name": g.get("groupName"),
                "replicas": g.get("replicas"),
                "min_replicas": g.get("minReplicas"),
                "max_replicas": g.get("maxReplicas"),
            }
            for g in groups
        ],
        "applications": {
            app: {
                "status": s.get("status"),
                "deployments": {d: v.get("status") for d, v in (s.get("serveDeploymentStatuses") or {}).items()},
            }
            for app, s in (active.get("applicationStatuses") or {}).items()
        },
    }


def format_status(summary: Mapping[str, Any]) -> str:
    s = summary
    lines = [
        f"RayService {s['namespace']}/{s['name']}: {'Ready' if s['ready'] else 'NotReady'} ({s['reason']})"
        + (" [upgrade in progress]" if s["upgrading"] else "")
    ]
    lines.append(
        f"  cluster {s['cluster'] or '-'}: state={s['cluster_state'] or '-'}, "
        f"workers ready {s['ready_workers']}/{s['desired_workers']}"
    )
    for g in s["worker_groups"]:
        lines.append(
            f"  group {g['name']}: replicas={g['replicas']} (min {g['min_replicas']}, max {g['max_replicas']})"
        )
    if not s["applications"]:
        lines.append("  serve: no application status yet")
    for app, a in s["applications"].items():
        deps = ", ".join(f"{d}={st}" for d, st in sorted(a["deployments"].items()))
        lines.append(f"  serve app {app}: {a['status']}" + (f" ({deps})" if deps else ""))
    return "\n".join(lines)
