"""Fixtures for the chart and `raymoe k8s` tests: offline schema validation, a helm-unittest runner,
a kustomize stand-in, and a stand-in Kubernetes API server on 127.0.0.1.

No cluster, helm binary or network is used: the Helm engine is helm-python-sdk (in-process), the
Kubernetes schemas are files, and the API server is a small `http.server` thread.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "raymoe"
K8S_DIR = REPO_ROOT / "k8s"
K8S_VERSION = "1.30"


def schemas_dir() -> Path:
    """`$RAYMOE_K8S_SCHEMAS`, else `<repo root>/../shared/k8s-schemas` (CI copies shared/ beside the clone)."""
    return Path(os.environ.get("RAYMOE_K8S_SCHEMAS") or REPO_ROOT.parent / "shared" / "k8s-schemas").resolve()


@pytest.fixture(scope="session")
def validate():
    """validate(docs) -> list of errors: CRDs against the shipped JSON schemas, core kinds strictly
    with kubernetes-validate (unknown fields are errors)."""
    folder = schemas_dir()
    if not (folder / "validate.py").exists():
        pytest.fail(f"Kubernetes schemas not found in {folder}: set RAYMOE_K8S_SCHEMAS to a copy of shared/k8s-schemas")
    pytest.importorskip("kubernetes_validate")
    sys.path.insert(0, str(folder))
    try:
        from validate import validate_documents
    finally:
        sys.path.remove(str(folder))

    def run(docs: list[dict[str, Any]], source: str = "<rendered>") -> list[str]:
        return validate_documents(docs, k8s_version=K8S_VERSION, source=source)

    return run


# ------------------------------------------------------------------ helm-unittest runner
# Runs helm/raymoe/tests/*_test.yaml (helm-unittest format, so `helm unittest helm/raymoe` runs the
# same suites where the plugin exists) on the in-process Helm engine. Supported asserts: the ones
# the suites use; an unknown one fails loudly instead of passing.


@dataclass
class UnitCase:
    suite_file: Path
    suite: dict[str, Any]
    test: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.suite_file.stem}: {self.test['it']}"


def unittest_cases() -> list[UnitCase]:
    cases = []
    for path in sorted((CHART_DIR / "tests").glob("*_test.yaml")):
        suite = yaml.safe_load(path.read_text())
        cases += [UnitCase(path, suite, test) for test in suite["tests"]]
    return cases


def set_path(values: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


_SEGMENT = re.compile(r"""([^.\[\]]+)|\[(\d+)\]|\[["']([^"']+)["']\]""")


def get_path(doc: Any, path: str) -> Any:
    """helm-unittest paths: `a.b[0].c`, `labels["app.kubernetes.io/name"]`. Raises KeyError if absent."""
    node = doc
    for name, index, quoted in _SEGMENT.findall(path):
        if index:
            if not isinstance(node, list) or int(index) >= len(node):
                raise KeyError(path)
            node = node[int(index)]
        else:
            key = quoted or name
            if not isinstance(node, dict) or key not in node:
                raise KeyError(path)
            node = node[key]
    return node


def _is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _is_subset(v, big[k]) for k, v in small.items())
    return small == big


def _check(kind: str, spec: dict[str, Any], doc: dict[str, Any]) -> None:
    if kind == "isKind":
        assert doc["kind"] == spec["of"], f"kind {doc['kind']} != {spec['of']}"
    elif kind == "equal":
        assert get_path(doc, spec["path"]) == spec["value"], f"{spec['path']}: {get_path(doc, spec['path'])!r}"
    elif kind == "notEqual":
        assert get_path(doc, spec["path"]) != spec["value"], spec["path"]
    elif kind == "matchRegex":
        assert re.search(spec["pattern"], get_path(doc, spec["path"])), f"{spec['path']} !~ {spec['pattern']}"
    elif kind == "contains":
        items = get_path(doc, spec["path"])
        assert spec["content"] in items, f"{spec['path']} lacks {spec['content']!r}: {items!r}"
    elif kind == "isSubset":
        assert _is_subset(spec["content"], get_path(doc, spec["path"])), spec["path"]
    elif kind == "exists":
        get_path(doc, spec["path"])
    elif kind == "notExists":
        with pytest.raises(KeyError):
            get_path(doc, spec["path"])
    elif kind == "lengthEqual":
        assert len(get_path(doc, spec["path"])) == spec["count"], spec["path"]
    else:
        raise AssertionError(f"unsupported helm-unittest assert {kind!r}")


def run_unittest_case(case: UnitCase) -> None:
    import helm_python

    from raymoe.k8s.render import load_values, merge_values

    suite, test = case.suite, case.test
    values = load_values([case.suite_file.parent / v for v in suite.get("values", []) + test.get("values", [])])
    for source in (suite.get("set") or {}, test.get("set") or {}):
        for dotted, value in source.items():
            set_path(values, dotted, copy.deepcopy(value))
    release = merge_values(suite.get("release") or {}, test.get("release") or {})
    default_template = test.get("template") or suite["templates"][0]
    try:
        with helm_python.Chart.load(str(CHART_DIR)) as chart:
            rendered = chart.render(
                values, name=release.get("name", "raymoe"), namespace=release.get("namespace", "default")
            )
        error = None
    except helm_python.HelmError as e:
        rendered, error = {}, str(e)
    for item in test["asserts"]:
        ((kind, spec),) = ((k, v) for k, v in item.items() if k not in ("documentIndex", "template"))
        spec = spec or {}
        if kind == "failedTemplate":
            assert error is not None, "rendering succeeded"
            assert re.search(spec["errorPattern"], error), f"error {error!r} !~ {spec['errorPattern']!r}"
            continue
        assert error is None, error
        template = item.get("template") or default_template
        docs = [d for d in yaml.safe_load_all(rendered.get(f"{CHART_DIR.name}/{template}", "")) if d]
        if kind == "hasDocuments":
            assert len(docs) == spec["count"], f"{template}: {len(docs)} documents"
            continue
        index = item.get("documentIndex", test.get("documentIndex"))
        assert docs, f"{template} rendered no documents"
        for doc in [docs[index]] if index is not None else docs:
            _check(kind, spec, doc)


# ------------------------------------------------------------------ kustomize stand-in
def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    """`kustomize build` for what k8s/ uses (a `resources:` list of files and folders); anything
    else in a kustomization fails here so the stand-in never silently diverges."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not unsupported, f"{folder}: kustomize stand-in does not handle {sorted(unsupported)}"
    docs: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        target = (folder / entry).resolve()
        if target.is_dir():
            docs += kustomize_build(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return docs


# ------------------------------------------------------------------ stand-in Kubernetes API
_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@dataclass
class FakeKubeAPI:
    """In-memory objects keyed by (group, plural, namespace, name), and switches for failures."""

    objects: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, content-type)
    missing_groups: set[str] = field(default_factory=set)  # CRD not installed: 404 without details
    faults: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # (METHOD, plural) -> (code, reason)
    url: str = ""

    def status(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if details is not None:
            body["details"] = details
        return body

    def handle(self, method: str, path: str, ctype: str, body: Any) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path, ctype))
        m = _PATH.match(path.split("?")[0])
        if not m:
            return 404, self.status(404, "NotFound", "the server could not find the requested resource")
        group, plural, ns, name = m["group"] or "", m["plural"], m["ns"], m["name"]
        fqn = f"{plural}.{group}" if group else plural
        if group in self.missing_groups:
            return 404, self.status(404, "NotFound", "the server could not find the requested resource")
        if (method, plural) in self.faults:
            code, reason = self.faults[(method, plural)]
            messages = {
                403: f'{fqn} "{name or body["metadata"]["name"]}" is forbidden: User "dev" cannot '
                f'{method.lower()} resource "{plural}" in API group "{group}" in the namespace "{ns}"',
                409: "Operation cannot be fulfilled: the object has been modified",
            }
            return code, self.status(code, reason, messages.get(code, reason))
        key_name = name or (body or {}).get("metadata", {}).get("name", "")
        key = (group, plural, ns, key_name)
        not_found = self.status(
            404, "NotFound", f'{fqn} "{key_name}" not found', {"name": key_name, "group": group, "kind": plural}
        )
        if method == "GET":
            return (200, self.objects[key]) if key in self.objects else (404, not_found)
        if method == "POST":
            if key in self.objects:
                return 409, self.status(
                    409,
                    "AlreadyExists",
                    f'{fqn} "{key_name}" already exists',
                    {"name": key_name, "group": group, "kind": plural},
                )
            obj = copy.deepcopy(body)
            obj["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1", namespace=ns)
            self.objects[key] = obj
            return 201, obj
        if method == "PATCH":
            if ctype != "application/merge-patch+json":
                return 415, self.status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
            if key not in self.objects:
                return 404, not_found
            obj = merge_patch(self.objects[key], body)
            obj["metadata"]["resourceVersion"] = str(int(self.objects[key]["metadata"]["resourceVersion"]) + 1)
            self.objects[key] = obj
            return 200, obj
        if method == "DELETE":
            if key not in self.objects:
                return 404, not_found
            return 200, self.objects.pop(key)  # like Services; other kinds answer a Status
        return 405, self.status(405, "MethodNotAllowed", method)

    def get(self, group: str, plural: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.objects.get((group, plural, namespace, name))


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, payload = api.handle(self.command, self.path, self.headers.get("Content-Type", ""), body)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "users": [{"name": "dev", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "dev", "namespace": namespace}}],
            }
        )
    )
    return path


@pytest.fixture
def kubeconfig(kube_api: FakeKubeAPI, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", kube_api.url)
