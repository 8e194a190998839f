"""`raymoe k8s render|apply|status|delete` through the main CLI (`raymoe.cli.main`).

No Kubernetes API server can run here, so the commands talk to a stand-in on 127.0.0.1 (the
`kube_api` fixture in conftest.py): an `http.server` thread answering GET/POST/PATCH/DELETE on
`/api/v1/...` and `/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]` with Kubernetes
`Status` bodies, reached through a real kubeconfig file and the real `kubernetes` client. Faults are
switched on per test: 404 on the resource itself (CRD missing), 403 (RBAC), 409 (conflict).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from raymoe.cli import main
from raymoe.k8s.cli import add_k8s_parser

from .conftest import CHART_DIR, K8S_DIR, write_kubeconfig

pytest.importorskip("kubernetes")

CPU_VALUES = str(CHART_DIR / "values-cpu-tiny.yaml")
CPU_MANIFEST = K8S_DIR / "overlays" / "cpu-tiny" / "rayservice.yaml"


@pytest.fixture
def needs_helm():
    pytest.importorskip("helm_python", reason="rendering needs helm-python-sdk")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["k8s", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ready_status(obj: dict[str, Any]) -> dict[str, Any]:
    """What KubeRay writes once the cluster is up and Serve runs the app."""
    return {
        **obj,
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "NonZeroServeEndpoints",
                    "message": "",
                    "lastTransitionTime": "2025-11-07T10:00:00Z",
                }
            ],
            "serviceStatus": "Running",
            "activeServiceStatus": {
                "rayClusterName": "raymoe-abcde",
                "rayClusterStatus": {"state": "ready", "readyWorkerReplicas": 2, "desiredWorkerReplicas": 2},
                "applicationStatuses": {
                    "raymoe": {
                        "status": "RUNNING",
                        "serveDeploymentStatuses": {
                            "OpenAiIngress": {"status": "HEALTHY"},
                            "AttentionTier": {"status": "HEALTHY"},
                        },
                    }
                },
            },
        },
    }


# ------------------------------------------------------------------ mounting
def test_add_k8s_parser_mounts_every_subcommand_with_one_call():
    parser = argparse.ArgumentParser(prog="raymoe")
    add_k8s_parser(parser.add_subparsers(dest="command", required=True))
    for argv in (
        ["k8s", "render"],
        ["k8s", "apply", "-m", "x.yaml"],
        ["k8s", "status"],
        ["k8s", "delete", "--name", "x"],
    ):
        ns = parser.parse_args(argv)
        assert callable(ns.func) and ns.k8s_command == argv[1]


# ------------------------------------------------------------------ render
def test_render_prints_the_chart_objects_as_yaml(capsys, needs_helm, tmp_path: Path):
    code, out, _ = run(capsys, "render", "-f", CPU_VALUES, "-n", "llm")
    assert code == 0
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == [
        "NetworkPolicy",
        "Secret",
        "ConfigMap",
        "Service",
        "RayService",
        "PodMonitor",
        "PodMonitor",
    ]  # Helm's install order
    assert {d["metadata"]["namespace"] for d in docs} == {"llm"}
    assert run(capsys, "render", "-f", CPU_VALUES, "-n", "llm", "-o", str(tmp_path / "out.yaml")) == (0, "", "")
    assert [d for d in yaml.safe_load_all((tmp_path / "out.yaml").read_text()) if d] == docs


def test_render_reports_a_missing_required_value_in_one_line(capsys, needs_helm):
    code, out, err = run(capsys, "render", "-f", str(CHART_DIR / "values-gpu-k2-thinking.yaml"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "modelStorage.pvc.claimName is required" in err


# ------------------------------------------------------------------ apply
def test_apply_creates_every_object_then_patches_them(capsys, needs_helm, kube_api, kubeconfig):
    code, out, err = run(capsys, "apply", "-f", CPU_VALUES, "--kubeconfig", str(kubeconfig), "-n", "llm")
    assert code == 0, err
    assert out.splitlines() == [
        "networkpolicy.networking.k8s.io/raymoe created",
        "secret/raymoe-api-keys created",
        "configmap/raymoe-dashboard created",
        "service/raymoe-openai created",
        "rayservice.ray.io/raymoe created",
        "podmonitor.monitoring.coreos.com/raymoe-head created",
        "podmonitor.monitoring.coreos.com/raymoe-worker created",
    ]
    stored = kube_api.get("ray.io", "rayservices", "raymoe", "llm")
    assert stored["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["groupName"] == "expert"

    code, out, _ = run(capsys, "apply", "-f", CPU_VALUES, "--kubeconfig", str(kubeconfig), "-n", "llm")
    assert code == 0 and out.count(" configured") == 7
    patches = [r for r in kube_api.requests if r[0] == "PATCH"]
    assert len(patches) == 7 and {r[2] for r in patches} == {"application/merge-patch+json"}


def test_apply_manifest_uses_the_kubeconfig_context_namespace(capsys, kube_api, tmp_path: Path):
    config = write_kubeconfig(tmp_path / "kc", kube_api.url, namespace="team-a")
    code, out, err = run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(config))
    assert (code, out) == (0, "rayservice.ray.io/raymoe created\n"), err
    assert kube_api.get("ray.io", "rayservices", "raymoe", "team-a") is not None


def test_apply_rejects_an_invalid_raymoe_config_before_calling_the_api(capsys, kube_api, kubeconfig, tmp_path: Path):
    doc = yaml.safe_load(CPU_MANIFEST.read_text())
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("max_num_seqs", "max_num_seq")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    code, _, err = run(capsys, "apply", "-m", str(tmp_path / "bad.yaml"), "--kubeconfig", str(kubeconfig))
    assert code == 2 and "invalid raymoe config" in err and "max_num_seq" in err
    assert kube_api.requests == []


def test_apply_says_kuberay_is_missing_when_the_crd_is_not_installed(capsys, kube_api, kubeconfig):
    kube_api.missing_groups.add("ray.io")
    code, out, err = run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(
        "raymoe k8s: error: RayService API ray.io/v1 is not served by this cluster (404 on rayservices.ray.io)"
    )
    assert "install the KubeRay operator" in err


def test_apply_names_the_rbac_verb_when_forbidden(capsys, kube_api, kubeconfig):
    kube_api.faults[("GET", "rayservices")] = (403, "Forbidden")
    code, _, err = run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))
    assert code == 1 and err.count("\n") == 1
    assert 'forbidden (403): rayservices.ray.io "raymoe" is forbidden: User "dev" cannot get' in err
    assert "need 'get' on rayservices.ray.io in namespace default (check RBAC)" in err


def test_apply_reports_a_conflict_in_one_line(capsys, kube_api, kubeconfig):
    kube_api.faults[("POST", "rayservices")] = (409, "Conflict")
    code, _, err = run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))
    assert code == 1 and err.count("\n") == 1
    assert "conflict (409) on RayService default/raymoe" in err and "re-run" in err


def test_apply_reports_an_unreachable_api_server_in_one_line(capsys, tmp_path: Path):
    config = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")  # discard port: nothing listens
    code, _, err = run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(config))
    assert code == 1 and err.count("\n") == 1 and "cannot reach the Kubernetes API at http://127.0.0.1:9" in err


# ------------------------------------------------------------------ status
def test_status_shows_serve_application_worker_groups_and_ready_replicas(capsys, kube_api, kubeconfig):
    assert run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))[0] == 0
    key = ("ray.io", "rayservices", "default", "raymoe")
    kube_api.objects[key] = ready_status(kube_api.objects[key])
    code, out, _ = run(capsys, "status", "--kubeconfig", str(kubeconfig))
    assert code == 0
    assert out.splitlines() == [
        "RayService default/raymoe: Ready (NonZeroServeEndpoints)",
        "  cluster raymoe-abcde: state=ready, workers ready 2/2",
        "  group attention: replicas=1 (min 1, max 2)",
        "  group expert: replicas=1 (min 1, max 1)",
        "  serve app raymoe: RUNNING (AttentionTier=HEALTHY, OpenAiIngress=HEALTHY)",
    ]
    code, out, _ = run(capsys, "status", "--kubeconfig", str(kubeconfig), "--json")
    summary = json.loads(out)
    assert summary["ready"] is True and summary["applications"]["raymoe"]["status"] == "RUNNING"
    assert summary["ready_workers"] == summary["desired_workers"] == 2


def test_status_of_a_fresh_rayservice_says_not_ready(capsys, kube_api, kubeconfig):
    assert run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))[0] == 0
    code, out, _ = run(capsys, "status", "--kubeconfig", str(kubeconfig))
    assert code == 0 and out.startswith("RayService default/raymoe: NotReady (Pending)")
    assert "serve: no application status yet" in out


def test_status_of_a_missing_rayservice_fails(capsys, kube_api, kubeconfig):
    code, _, err = run(capsys, "status", "--name", "nope", "--kubeconfig", str(kubeconfig))
    assert code == 1 and err == "raymoe k8s: error: RayService default/nope not found\n"


# ------------------------------------------------------------------ delete
def test_delete_removes_the_rayservice_and_reports_a_missing_one(capsys, kube_api, kubeconfig):
    assert run(capsys, "apply", "-m", str(CPU_MANIFEST), "--kubeconfig", str(kubeconfig))[0] == 0
    assert run(capsys, "delete", "--kubeconfig", str(kubeconfig)) == (0, "rayservice.ray.io/raymoe deleted\n", "")
    assert kube_api.get("ray.io", "rayservices", "raymoe") is None
    code, out, _ = run(capsys, "delete", "--kubeconfig", str(kubeconfig))
    assert code == 1 and out == "rayservice.ray.io/raymoe not found (namespace default)\n"
    assert run(capsys, "delete", "--kubeconfig", str(kubeconfig), "--ignore-not-found")[0] == 0


def test_delete_manifest_removes_every_object_in_reverse_order(
    capsys, needs_helm, kube_api, kubeconfig, tmp_path: Path
):
    assert run(capsys, "render", "-f", CPU_VALUES, "-o", str(tmp_path / "all.yaml"))[0] == 0
    assert run(capsys, "apply", "-m", str(tmp_path / "all.yaml"), "--kubeconfig", str(kubeconfig))[0] == 0
    code, out, err = run(capsys, "delete", "-m", str(tmp_path / "all.yaml"), "--kubeconfig", str(kubeconfig))
    assert code == 0, err
    assert out.splitlines()[0] == "podmonitor.monitoring.coreos.com/raymoe-worker deleted"
    assert out.count(" deleted") == 7 and kube_api.objects == {}


def test_delete_says_kuberay_is_missing_when_the_crd_is_not_installed(capsys, kube_api, kubeconfig):
    kube_api.missing_groups.add("ray.io")
    code, _, err = run(capsys, "delete", "--kubeconfig", str(kubeconfig))
    assert code == 1 and "not served by this cluster (404 on rayservices.ray.io)" in err
