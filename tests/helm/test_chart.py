"""helm/raymoe and k8s/: rendered with the real Helm engine, validated against real schemas.

- Helm: helm-python-sdk (Helm v4 in-process: `Chart.render`, and `helm_python.lint(strict=True)`,
  the library form of `helm lint --strict`). No helm binary, no cluster.
- Schemas: `$RAYMOE_K8S_SCHEMAS`, else `Path(repo_root).parent / "shared" / "k8s-schemas"` (here
  /work/shared/k8s-schemas; CI copies shared/ beside the clone). KubeRay RayService and PodMonitor
  against the CRD JSON schemas shipped there, core kinds strictly with kubernetes-validate.
- helm-unittest suites (helm/raymoe/tests/*_test.yaml) run through the runner in conftest.py.
- k8s/ overlays: built by the kustomize stand-in in conftest.py, and compared with
  `kustomize build` / `kubectl kustomize` when either binary exists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from raymoe.config import RayMoEConfig

from .conftest import (
    CHART_DIR,
    K8S_DIR,
    get_path,
    kustomize_build,
    run_unittest_case,
    unittest_cases,
)

helm_python = pytest.importorskip("helm_python", reason="chart tests need helm-python-sdk")

from raymoe.k8s import render as k8s_render  # noqa: E402
from raymoe.tools import gen_helm_schema  # noqa: E402

GPU_PVC = {"modelStorage": {"pvc": {"claimName": "k2-weights"}}}
VARIANTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "default": ([], {}),
    "cpu-tiny": (["values-cpu-tiny.yaml"], {}),
    "gpu-k2-thinking": (["values-gpu-k2-thinking.yaml"], GPU_PVC),
    # The other two model sources, on top of the GPU values.
    "gpu-object-storage": (
        ["values-gpu-k2-thinking.yaml"],
        {"modelStorage": {"type": "objectStorage", "objectStorage": {"uri": "s3://m/k2", "sizeLimit": "700Gi"}}},
    ),
    "gpu-host-path": (
        ["values-gpu-k2-thinking.yaml"],
        {"modelStorage": {"type": "hostPath", "hostPath": {"path": "/nvme/k2"}}},
    ),
}


def user_values(variant: str) -> dict[str, Any]:
    files, extra = VARIANTS[variant]
    return k8s_render.merge_values(k8s_render.load_values([CHART_DIR / f for f in files]), extra)


def render(variant: str, **kw: Any) -> list[dict[str, Any]]:
    return k8s_render.render_chart(user_values(variant), **kw)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def serve_app(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rayservice,) = by_kind(docs, "RayService")
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]


def pod_templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """node type ("head"/"worker:<group>") -> pod template."""
    cluster = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({f"worker:{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


# ------------------------------------------------------------------ helm-unittest suites
@pytest.mark.parametrize("case", unittest_cases(), ids=lambda c: c.id)
def test_helm_unittest_case(case):
    run_unittest_case(case)


# ------------------------------------------------------------------ every values file
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_validate_strictly_against_kubernetes_schemas(variant, validate):
    docs = render(variant, namespace="llm")
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ConfigMap", "NetworkPolicy", "PodMonitor", "PodMonitor", "RayService", "Secret", "Service"]
    )
    assert validate(docs, source=variant) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_args_parse_back_to_the_values_raymoe_block(variant):
    app = serve_app(render(variant))
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        merged = chart.merge_values(user_values(variant))["raymoe"]
    assert app["import_path"] == "raymoe.serve.builders:build_app"
    assert app["args"] == merged  # verbatim, big integers (kv_cache_memory) included
    assert RayMoEConfig.model_validate(app["args"]) == RayMoEConfig.model_validate(merged)


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict_reports_nothing(variant):
    report = helm_python.lint(str(CHART_DIR), user_values(variant), strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("variant", VARIANTS)
def test_cross_object_references_resolve(variant):
    """What the schemas cannot see: selectors, port names and Secret names must meet their targets."""
    docs = render(variant)
    pods = pod_templates(docs)
    (service,) = by_kind(docs, "Service")
    (secret,) = by_kind(docs, "Secret")
    (policy,) = by_kind(docs, "NetworkPolicy")
    serve_selector = {k: v for k, v in service["spec"]["selector"].items() if k != "ray.io/serve"}  # KubeRay sets it
    for name, pod in pods.items():
        labels = pod["metadata"]["labels"]
        ray = pod["spec"]["containers"][0]
        ports = {p["name"] for p in ray["ports"]}
        assert serve_selector.items() <= labels.items(), name
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), name
        assert service["spec"]["ports"][0]["targetPort"] in ports, name
        refs = [e["valueFrom"]["secretKeyRef"] for e in ray["env"] if "valueFrom" in e]
        assert {"name": secret["metadata"]["name"], "key": "api-keys"} in refs, name
    for monitor in by_kind(docs, "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        node_type = selector["ray.io/node-type"]
        matched = [p for n, p in pods.items() if n.split(":")[0] == node_type]
        assert matched, monitor["metadata"]["name"]
        for pod in matched:  # KubeRay adds ray.io/node-type; our labels must match the rest
            assert {k: v for k, v in selector.items() if k != "ray.io/node-type"}.items() <= pod["metadata"][
                "labels"
            ].items()
            ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert {"port": 8080, "protocol": "TCP"} in [p for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]


def test_gpu_values_fail_to_render_until_the_model_pvc_is_named():
    values = k8s_render.load_values([CHART_DIR / "values-gpu-k2-thinking.yaml"])
    with pytest.raises(
        k8s_render.RenderError, match="modelStorage.pvc.claimName is required when modelStorage.type is pvc"
    ):
        k8s_render.render_chart(values)


def test_gpu_values_size_the_tiers_from_the_k2_inspect_numbers():
    """values-gpu-k2-thinking.yaml against `raymoe inspect --preset kimi-k2-thinking` (DESIGN §1)."""
    gib = 2**30
    routed_experts, rest, kv_per_token, hbm = 531.6 * gib, 23e9, 70_272, 139 * gib  # H200 usable
    docs = render("gpu-k2-thinking")
    args = serve_app(docs)["args"]
    groups = {g["groupName"]: g for g in by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpus = {
        n: g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for n, g in groups.items()
    }
    shards = args["parallel"]["num_expert_shards"]
    assert shards == groups["expert"]["replicas"] * gpus["expert"] == 8
    assert groups["expert"]["rayStartParams"]["resources"] == '"{\\"expert\\":8}"'
    assert routed_experts / shards < 0.5 * hbm  # 66.5 GiB of 139 per GPU
    kv = args["engine"]["kv_cache_memory"]
    assert rest + kv < 0.9 * hbm  # weights + KV leave >10% for activations
    assert kv // kv_per_token >= args["engine"]["max_model_len"] * 5  # five full 256K contexts per replica
    attention = args["serve"]["attention"]
    assert (
        attention["autoscaling"]["max_replicas"] * attention["num_gpus"]
        <= groups["attention"]["maxReplicas"] * gpus["attention"]
    )


def test_release_names_stay_within_kubernetes_limits():
    long_release = "r" + "x" * 60
    docs = k8s_render.render_chart({}, name=long_release)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    assert len(by_kind(docs, "RayService")[0]["metadata"]["name"]) <= 47  # KubeRay MaxRayServiceNameLength


def test_config_file_replaces_the_raymoe_block_verbatim(tmp_path: Path):
    config = {"model": {"path": "/models/k2"}, "engine": {"max_num_seqs": 8}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    values = k8s_render.merge_values(
        {"modelStorage": {"type": "hostPath", "hostPath": {"path": "/mnt/k2"}}, "expertWorkers": {"enabled": False}},
        k8s_render.config_values(tmp_path / "cfg.yaml"),
    )
    assert serve_app(k8s_render.render_chart(values))["args"] == config  # the default preset: tiny is gone


def test_config_file_with_a_typo_is_rejected_before_rendering(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text("engine: {max_num_seq: 8}\n")
    with pytest.raises(ValueError, match="max_num_seq"):
        k8s_render.config_values(tmp_path / "cfg.yaml")


# ------------------------------------------------------------------ values.schema.json
def test_values_schema_matches_a_fresh_generation():
    assert (CHART_DIR / "values.schema.json").read_text() == gen_helm_schema.render_schema(), (
        "values.schema.json is stale: run python -m raymoe.tools.gen_helm_schema"
    )
    assert gen_helm_schema.main(["--check"]) == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"raymoe": {"engine": {"max_num_seq": 8}}}, "additional properties 'max_num_seq' not allowed"),
        ({"raymoe": {"parallel": {"transport": "nccl"}}}, "/raymoe/parallel/transport"),
        ({"expertWorkers": {"shardsPerNode": 0}}, "/expertWorkers/shardsPerNode"),
        ({"modelStorage": {"type": "s3"}}, "/modelStorage/type"),
        ({"imagee": {}}, "additional properties 'imagee' not allowed"),
    ],
)
def test_values_schema_rejects_typos_and_bad_values(values, message):
    with helm_python.Chart.load(str(CHART_DIR)) as chart, pytest.raises(helm_python.HelmValuesError, match=message):
        chart.render(values)


def test_every_chart_value_needs_a_doc_comment():
    text = (CHART_DIR / "values.yaml").read_text() + "undocumented: 1\n"
    with pytest.raises(ValueError, match="undocumented has no `# --` comment"):
        gen_helm_schema.build_schema(text)


def test_schema_describes_values_with_their_comments():
    schema = gen_helm_schema.build_schema((CHART_DIR / "values.yaml").read_text())
    assert get_path(schema, "properties.expertWorkers.properties.shardsPerNode.description").startswith("Expert shards")
    assert schema["properties"]["raymoe"]["additionalProperties"] is False
    assert set(schema["$defs"]) >= {"ModelConfig", "EngineConfig", "ParallelConfig", "ServeConfig"}


# ------------------------------------------------------------------ k8s/ plain manifests
def test_k8s_manifests_match_the_chart():
    tree = k8s_render.k8s_tree()
    on_disk = {str(p.relative_to(K8S_DIR)) for p in K8S_DIR.rglob("*.yaml")}
    assert on_disk == set(tree), "k8s/ has stray or missing files: run python -m raymoe.k8s.render"
    stale = [rel for rel, text in tree.items() if (K8S_DIR / rel).read_text() != text]
    assert not stale, f"stale: {stale}; run python -m raymoe.k8s.render"


@pytest.mark.parametrize("overlay", sorted(k8s_render.OVERLAYS))
def test_k8s_overlay_builds_and_validates(overlay, validate):
    folder = K8S_DIR / "overlays" / overlay
    docs = kustomize_build(folder)
    assert [d["kind"] for d in docs].count("RayService") == 1
    assert validate(docs, source=overlay) == []
    for path in sorted(folder.glob("*.yaml")) + sorted((K8S_DIR / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            assert validate([d for d in yaml.safe_load_all(path.read_text()) if d], source=str(path)) == []
    binary = shutil.which("kustomize") or shutil.which("kubectl")
    if binary:  # the stand-in must agree with the real thing
        cmd = [binary, "build", str(folder)] if binary.endswith("kustomize") else [binary, "kustomize", str(folder)]
        real = [
            d for d in yaml.safe_load_all(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) if d
        ]
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(real, key=key) == sorted(docs, key=key)


def test_k8s_rayservice_equals_the_chart_render_without_helm_bookkeeping():
    (chart_rs,) = by_kind(render("cpu-tiny"), "RayService")
    plain = yaml.safe_load((K8S_DIR / "overlays" / "cpu-tiny" / "rayservice.yaml").read_text())
    assert plain["spec"] == chart_rs["spec"]
    assert "namespace" not in plain["metadata"] and "helm.sh/chart" not in plain["metadata"]["labels"]
