"""`raymoe k8s render|apply|status|delete`: the chart and the RayService from the command line.

Mounted by the main CLI with `add_k8s_parser(subparsers)`; the handler is set as `func`, so
`ns.func(ns)` runs it. `kubernetes` and `helm_python` load only when a command runs, keeping
`raymoe --help` fast. Exit codes: 0 ok, 1 Kubernetes API error, 2 bad input (values, config, file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from raymoe.k8s.render import CHART_DIR, DEFAULT_RELEASE, RenderError

BUILD_APP = "raymoe.serve.builders:build_app"


def add_k8s_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `k8s` and its subcommands to the main parser's subparsers; returns the `k8s` parser."""
    k = subparsers.add_parser(
        "k8s",
        help="render, apply, inspect or delete the KubeRay RayService",
        description="Deploy raymoe on Kubernetes through KubeRay (helm/raymoe).",
    )
    ks = k.add_subparsers(dest="k8s_command", required=True, metavar="{render,apply,status,delete}")

    def chart_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-f",
            "--values",
            action="append",
            default=[],
            metavar="FILE",
            help="values file, as for helm -f (repeatable; later files win)",
        )
        p.add_argument("--config", metavar="FILE", help="raymoe config YAML that replaces the chart's raymoe block")
        p.add_argument("--release", default=DEFAULT_RELEASE, help="release name (default: raymoe)")
        p.add_argument("--chart", type=Path, default=CHART_DIR, help="chart folder (default: helm/raymoe)")

    def cluster_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context")

    r = ks.add_parser("render", help="print the chart's objects as YAML (like helm template)")
    chart_options(r)
    r.add_argument("-n", "--namespace", default="default", help="release namespace (default: default)")
    r.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")

    a = ks.add_parser("apply", help="create or patch the rendered objects (or those of --manifest)")
    chart_options(a)
    cluster_options(a)
    a.add_argument("-m", "--manifest", type=Path, help="apply this YAML (e.g. from render or k8s/) instead")

    s = ks.add_parser("status", help="readiness, Serve applications and worker groups of a RayService")
    s.add_argument("--name", default=DEFAULT_RELEASE, help="RayService name (default: raymoe)")
    cluster_options(s)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    d = ks.add_parser("delete", help="delete the RayService (or every object of --manifest)")
    d.add_argument("--name", default=DEFAULT_RELEASE, help="RayService name (default: raymoe)")
    cluster_options(d)
    d.add_argument("-m", "--manifest", type=Path, help="delete every object in this YAML instead")
    d.add_argument("--ignore-not-found", action="store_true", help="exit 0 when the object is already gone")

    k.set_defaults(func=run_k8s)
    return k


def run_k8s(ns: argparse.Namespace) -> int:
    """Handler of every `raymoe k8s` subcommand; errors become one line on stderr."""
    from raymoe.k8s.client import K8sError

    commands = {"render": _render, "apply": _apply, "status": _status, "delete": _delete}
    try:
        return commands[ns.k8s_command](ns)
    except K8sError as e:
        print(f"raymoe k8s: error: {e}", file=sys.stderr)
        return 1
    except (RenderError, ValueError, OSError) as e:
        print(f"raymoe k8s: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- commands
def _rendered(ns: argparse.Namespace, namespace: str) -> list[dict[str, Any]]:
    from raymoe.k8s.render import config_values, load_values, merge_values, render_chart

    values = load_values(ns.values)
    if ns.config:
        values = merge_values(values, config_values(ns.config, ns.chart))
    return render_chart(values, name=ns.release, namespace=namespace, chart_dir=ns.chart)


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not all(isinstance(d, dict) and "kind" in d and "metadata" in d for d in docs):
        raise ValueError(f"{path}: every document must be a Kubernetes object (kind, metadata)")
    return docs


def check_serve_args(docs: list[dict[str, Any]]) -> None:
    """Validate the raymoe config of every build_app application before anything reaches the cluster."""
    from raymoe.config import RayMoEConfig

    for doc in docs:
        if doc.get("kind") != "RayService":
            continue
        serve = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2") or "{}") or {}
        for app in serve.get("applications") or []:
            if app.get("import_path") == BUILD_APP:
                try:
                    RayMoEConfig.model_validate(app.get("args") or {})
                except ValueError as e:
                    raise ValueError(
                        f"RayService {doc['metadata'].get('name')} application "
                        f"{app.get('name')}: invalid raymoe config: {e}"
                    ) from e


def _render(ns: argparse.Namespace) -> int:
    from raymoe.k8s.render import to_yaml

    text = to_yaml(_rendered(ns, ns.namespace))
    if ns.output:
        ns.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _client(ns: argparse.Namespace) -> tuple[Any, str]:
    from raymoe.k8s.client import KubeClient, connect

    api_client, context_ns = connect(ns.kubeconfig, ns.context)
    return KubeClient(api_client), ns.namespace or context_ns


def _ref(doc: dict[str, Any]) -> str:
    group = doc["apiVersion"].rpartition("/")[0]
    return f"{doc['kind'].lower()}{'.' + group if group else ''}/{doc['metadata']['name']}"


def _apply(ns: argparse.Namespace) -> int:
    kube, namespace = _client(ns)
    docs = _read_manifest(ns.manifest) if ns.manifest else _rendered(ns, namespace)
    check_serve_args(docs)
    for doc in docs:
        print(f"{_ref(doc)} {kube.apply(doc, namespace)}")
    return 0


def _status(ns: argparse.Namespace) -> int:
    from raymoe.k8s.client import format_status, summarize

    kube, namespace = _client(ns)
    obj = kube.get_rayservice(ns.name, namespace)
    if obj is None:
        print(f"raymoe k8s: error: RayService {namespace}/{ns.name} not found", file=sys.stderr)
        return 1
    summary = summarize(obj)
    print(json.dumps(summary, indent=2) if ns.json else format_status(summary))
    return 0


def _delete(ns: argparse.Namespace) -> int:
    kube, namespace = _client(ns)
    if ns.manifest:
        targets = [
            (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace") or namespace, _ref(d))
            for d in reversed(_read_manifest(ns.manifest))
        ]
    else:
        targets = [("RayService", ns.name, namespace, f"rayservice.ray.io/{ns.name}")]
    missing = False
    for kind, name, target_ns, ref in targets:
        if kube.delete(kind, name, target_ns):
            print(f"{ref} deleted")
        else:
            missing = True
            print(f"{ref} not found (namespace {target_ns})")
    return 1 if missing and not (ns.ignore_not_found or ns.manifest) else 0
