"""Render the `helm/raymoe` chart offline and write the plain manifests under `k8s/`.

The Helm engine comes from `helm-python-sdk` (Helm v4 compiled into a wheel: no helm binary, no
cluster, no network). Values files merge the way `helm -f a.yaml -f b.yaml` merges them; a raymoe
config file (`--config`) replaces the chart's `raymoe:` block wholesale, after
`RayMoEConfig.model_validate` has accepted it. `k8s/` holds the same objects as plain YAML for
users without Helm; `python -m raymoe.k8s.render --check` fails when they drift from the chart.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "raymoe"
K8S_DIR = REPO_ROOT / "k8s"
DEFAULT_RELEASE = "raymoe"

# Helm's install order (pkg/release/util/kind_sorter.go), for the kinds this chart renders.
_KIND_ORDER = ["Namespace", "NetworkPolicy", "Secret", "ConfigMap", "Service", "RayService", "PodMonitor"]


class RenderError(ValueError):
    """The chart did not render: a template `required`/`fail`, or values rejected by the schema."""


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two values trees like `helm -f` (maps merge, anything else is replaced, nulls kept)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(files: Iterable[str | Path]) -> dict[str, Any]:
    """Read and merge values files in order (later files win)."""
    values: dict[str, Any] = {}
    for path in files:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RenderError(f"cannot read values file {path}: {e}") from e
        if not isinstance(data, dict):
            raise RenderError(f"values file {path} must hold a mapping, got {type(data).__name__}")
        values = merge_values(values, data)
    return values


def replace_block(default: Any, new: Mapping[str, Any]) -> dict[str, Any]:
    """Values that make Helm's coalesced block equal `new` exactly: defaults absent from `new` become null."""
    out: dict[str, Any] = dict(copy.deepcopy(new))
    if isinstance(default, Mapping):
        for key, value in default.items():
            if key not in out:
                out[key] = None
            elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
                out[key] = replace_block(value, out[key])
    return out


def config_values(config_path: str | Path, chart_dir: Path = CHART_DIR) -> dict[str, Any]:
    """Values that set the chart's `raymoe:` block to a validated raymoe config file, verbatim."""
    from raymoe.config import RayMoEConfig

    RayMoEConfig.from_yaml(config_path)  # raises ValueError naming the bad field
    data = yaml.safe_load(Path(config_path).read_text()) or {}
    defaults = yaml.safe_load((chart_dir / "values.yaml").read_text()).get("raymoe") or {}
    return {"raymoe": replace_block(defaults, data)}


def render_chart(
    values: Mapping[str, Any] | None = None,
    *,
    name: str = DEFAULT_RELEASE,
    namespace: str = "default",
    chart_dir: str | Path = CHART_DIR,
) -> list[dict[str, Any]]:
    """Render the chart to Kubernetes objects in install order (NOTES.txt and empty documents dropped).

    Raises:
        RenderError: a template failed (`required`, `fail`) or the values broke values.schema.json.
    """
    try:
        import helm_python
    except ImportError as e:
        raise RenderError(
            "rendering needs helm-python-sdk (pip install helm-python-sdk), or use `helm template`"
        ) from e
    try:
        with helm_python.Chart.load(str(chart_dir)) as chart:
            manifests = chart.render(dict(values or {}), name=name, namespace=namespace)
    except helm_python.HelmError as e:
        raise RenderError(" ".join(str(e).split())) from e
    docs = [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return sorted(docs, key=lambda d: _KIND_ORDER.index(d["kind"]) if d["kind"] in _KIND_ORDER else len(_KIND_ORDER))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, dashboard JSON) as `|` blocks, the way the chart writes them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(docs: Iterable[Mapping[str, Any]]) -> str:
    """Multi-document YAML, keys in the order the chart wrote them."""
    return "".join("---\n" + yaml.dump(dict(d), Dumper=_BlockDumper, sort_keys=False, width=120) for d in docs)


# ------------------------------------------------------------------ k8s/ plain manifests

# overlay -> (values file, extra values); the GPU overlay needs a PVC name to render at all.
OVERLAYS = {
    "cpu-tiny": ("values-cpu-tiny.yaml", {}),
    "gpu-k2-thinking": ("values-gpu-k2-thinking.yaml", {"modelStorage": {"pvc": {"claimName": "kimi-k2-thinking"}}}),
}
_BASE_FILES = {
    "Secret": "api-keys-secret.yaml",
    "ConfigMap": "grafana-dashboard.yaml",
    "Service": "openai-service.yaml",
    "NetworkPolicy": "networkpolicy.yaml",
    "PodMonitor": "podmonitors.yaml",
}
_HEADER = (
    "# Generated by `python -m raymoe.k8s.render` from helm/raymoe ({source}); do not edit.\n"
    "# Change the chart or its values file, then regenerate.\n"
)


def _plain(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A chart object without Helm's bookkeeping: no namespace (kustomize/kubectl -n set it), no Helm labels."""
    doc = copy.deepcopy(dict(doc))
    meta = doc["metadata"]
    meta.pop("namespace", None)
    for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
        meta.get("labels", {}).pop(key, None)
    return doc


def _kustomization(resources: list[str], comment: str) -> str:
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}
    return comment + yaml.safe_dump(body, sort_keys=False)


def k8s_tree(chart_dir: Path = CHART_DIR) -> dict[str, str]:
    """Every file under k8s/ (relative path -> text): a shared base and one overlay per values file."""
    files: dict[str, str] = {}
    base: dict[str, list[dict[str, Any]]] | None = None
    for overlay, (values_file, extra) in OVERLAYS.items():
        values = merge_values(load_values([chart_dir / values_file]), extra)
        docs = [_plain(d) for d in render_chart(values, chart_dir=chart_dir)]
        shared: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            if doc["kind"] == "RayService":
                text = _HEADER.format(source=values_file) + to_yaml([doc])
                files[f"overlays/{overlay}/rayservice.yaml"] = text
            else:
                shared.setdefault(_BASE_FILES[doc["kind"]], []).append(doc)
        if base is None:
            base = shared
        elif shared != base:
            raise RenderError(
                f"{values_file} changes objects outside the RayService; k8s/base would differ per overlay"
            )
        extra_note = (
            (
                "# The PVC name `kimi-k2-thinking` is a placeholder: create that PVC (ReadOnlyMany, the\n"
                "# Kimi-K2-Thinking checkpoint) or edit rayservice.yaml.\n"
            )
            if overlay == "gpu-k2-thinking"
            else ""
        )
        comment = (
            _HEADER.format(source=values_file)
            + extra_note
            + f"#   kubectl apply -k k8s/overlays/{overlay} -n <namespace>\n"
        )
        files[f"overlays/{overlay}/kustomization.yaml"] = _kustomization(["../../base", "rayservice.yaml"], comment)
    assert base is not None
    for filename, docs in sorted(base.items()):
        files[f"base/{filename}"] = _HEADER.format(source="objects shared by every values file") + to_yaml(docs)
    files["base/kustomization.yaml"] = _kustomization(
        sorted(base),
        _HEADER.format(source="objects shared by every values file")
        + "# Objects every overlay shares; each overlay adds its RayService.\n",
    )
    return dict(sorted(files.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymoe.k8s.render", description="Regenerate k8s/ from helm/raymoe.")
    ap.add_argument("--out", type=Path, default=K8S_DIR, help="target folder (default: k8s/)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if k8s/ is stale")
    ns = ap.parse_args(argv)
    tree = k8s_tree()
    stale = [rel for rel, text in tree.items() if not (ns.out / rel).exists() or (ns.out / rel).read_text() != text]
    if ns.check:
        if stale:
            print(f"stale under {ns.out}: {', '.join(stale)}; run python -m raymoe.k8s.render", file=sys.stderr)
            return 1
        print(f"{ns.out} is up to date")
        return 0
    for rel in stale:
        (ns.out / rel).parent.mkdir(parents=True, exist_ok=True)
        (ns.out / rel).write_text(tree[rel])
    print(f"wrote {len(stale)} file(s) under {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
