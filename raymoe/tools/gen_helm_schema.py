"""Generate `helm/raymoe/values.schema.json` (Helm validates every install against it).

Two halves: the `raymoe` block is `RayMoEConfig.model_json_schema()` itself (its `$defs` hoisted to
the root so the `$ref`s resolve), so a typo in the config tree fails at `helm install` just as it
would in `RayMoEConfig.model_validate`; the chart's own camelCase values are typed from their
defaults in values.yaml, described by their `# --` comments, and closed (`additionalProperties:
false`) except for Kubernetes pass-through maps (resources, nodeSelector, ...).

    python -m raymoe.tools.gen_helm_schema           # rewrite the file
    python -m raymoe.tools.gen_helm_schema --check   # exit 1 if it is stale (CI, drift test)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from raymoe.config import RayMoEConfig

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "raymoe"

# Kubernetes/KubeRay objects passed through verbatim: any keys allowed, the API server checks them.
FREE_FORM = {
    "commonLabels",
    "podSecurityContext",
    "containerSecurityContext",
    "upgradeStrategy",
    "resources",
    "rayStartParams",
    "rayResources",
    "podLabels",
    "podAnnotations",
    "annotations",
    "labels",
    "nodeSelector",
    "affinity",
}
QUANTITY = {"type": ["string", "integer"]}
# Constraints a default value cannot show.
OVERRIDES: dict[str, dict[str, Any]] = {
    "image.tag": {"type": ["string", "number"]},
    "image.pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "rayVersion": {"type": ["string", "number"]},
    "serveConfig.proxyLocation": {"enum": ["EveryNode", "HeadOnly", "Disabled"]},
    "autoscaling.upscalingMode": {"enum": ["Default", "Conservative", "Aggressive"]},
    "modelStorage.type": {"enum": ["none", "pvc", "hostPath", "objectStorage"]},
    "modelStorage.objectStorage.image.tag": {"type": ["string", "number"]},
    "modelStorage.objectStorage.sizeLimit": QUANTITY,
    "openaiService.type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "openaiService.port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "attentionWorkers.maxReplicas": {"type": "integer", "minimum": 1},
    "expertWorkers.maxReplicas": {"type": "integer", "minimum": 1},
    "expertWorkers.shardsPerNode": {"type": "integer", "minimum": 1},
    **{f"{g}.shmSize": QUANTITY for g in ("head", "attentionWorkers", "expertWorkers")},
}
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_./-]+):(\s|$)")


def value_comments(text: str) -> dict[str, str]:
    """Map dotted value paths to their helm-docs `# -- ...` comment (continuation `#` lines joined)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending:
                pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not stripped or stripped.startswith("-") or not match:
            pending = []
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if pending:
            comments[".".join(k for _, k in stack)] = " ".join(pending)
        pending = []
    return comments


def _infer(value: Any, path: str, comments: dict[str, str]) -> dict[str, Any]:
    key = path.rsplit(".", 1)[-1]
    structural = isinstance(value, dict) and value and key not in FREE_FORM
    schema: dict[str, Any]
    if structural:
        schema = {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: _infer(v, f"{path}.{k}", comments) for k, v in value.items()},
        }
    elif isinstance(value, dict):
        schema = {"type": "object"}
        if key == "rayStartParams":
            schema["additionalProperties"] = {"type": ["string", "number", "boolean"]}
    elif isinstance(value, list):
        schema = {"type": "array"}
    elif isinstance(value, bool):
        schema = {"type": "boolean"}
    elif isinstance(value, int):
        schema = {"type": "integer", "minimum": 0}
    elif isinstance(value, float):
        schema = {"type": "number"}
    elif isinstance(value, str):
        schema = {"type": "string"}
    else:
        raise ValueError(f"values.yaml: {path} has no usable default ({value!r}); give it a typed default")
    schema.update(OVERRIDES.get(path, {}))
    if path in comments:
        schema = {"description": comments[path], **schema}
    elif not structural:
        raise ValueError(f"values.yaml: {path} has no `# --` comment; every value is documented")
    return schema


def build_schema(values_text: str) -> dict[str, Any]:
    """The full values schema for a values.yaml text."""
    values = yaml.safe_load(values_text)
    comments = value_comments(values_text)
    config = RayMoEConfig.model_json_schema()
    defs = config.pop("$defs", {})
    properties: dict[str, Any] = {"global": {"type": "object", "description": "Helm globals (parent charts)."}}
    for key, value in values.items():
        if key == "raymoe":
            properties[key] = {**config, "description": comments.get(key, config.get("description", ""))}
        else:
            properties[key] = _infer(value, key, comments)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "raymoe Helm values",
        "description": "Generated by `python -m raymoe.tools.gen_helm_schema` from raymoe/config.py and "
        "helm/raymoe/values.yaml; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "$defs": defs,
    }


def render_schema(chart_dir: Path = CHART_DIR) -> str:
    """The schema file's exact text."""
    schema = build_schema((chart_dir / "values.yaml").read_text())
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raymoe.tools.gen_helm_schema", description=__doc__.split("\n")[0])
    ap.add_argument("--chart", type=Path, default=CHART_DIR, help="chart folder (default: helm/raymoe)")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is stale")
    ns = ap.parse_args(argv)
    target = ns.chart / "values.schema.json"
    fresh = render_schema(ns.chart)
    if ns.check:
        if not target.exists() or target.read_text() != fresh:
            print(f"{target} is stale: run python -m raymoe.tools.gen_helm_schema", file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    target.write_text(fresh)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
