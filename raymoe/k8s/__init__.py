"""Kubernetes side of raymoe: render the Helm chart, and apply/inspect/delete the KubeRay RayService.

    render.py  helm/raymoe -> Kubernetes objects (Helm engine in-process), k8s/ plain manifests
    client.py  create-or-patch / status / delete through the `kubernetes` client, one-line errors
    cli.py     `raymoe k8s render|apply|status|delete` (mounted by raymoe/cli.py)

Nothing here imports Ray; `kubernetes` and `helm_python` are imported only when a command runs.
"""
