"""`build_app`: the one entry point from a config tree to a Ray Serve application (DESIGN §4).

    RayMoEConfig | dict (Serve YAML / KubeRay serveConfigV2 `args`) -> validate -> Application:
        OpenAiIngress (FastAPI, CPU) --handle--> AttentionTier (engine per replica, owns expert shards)

It is also Serve's `import_path` (`raymoe.serve.builders:build_app`), so a YAML or Helm-rendered
`args` block arrives here as a plain dict and is validated by the same `RayMoEConfig.model_validate`
as the CLI and `LLM(**kwargs)`. Each deployment's replicas, autoscaling, back-pressure and resources
come from `serve.ingress` / `serve.attention`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from raymoe.config import DeploymentConfig, RayMoEConfig
from raymoe.serve.ingress import OpenAiIngress
from raymoe.serve.tier import AttentionTier


def validate_config(config: RayMoEConfig | dict[str, Any] | None) -> RayMoEConfig:
    """The config tree from a model or a plain dict; errors name each bad field and value.

    Raises:
        ValueError: e.g. `invalid raymoe config: serve.port = 70000: Input should be less than or equal to 65535`.
    """
    if isinstance(config, RayMoEConfig):
        return config
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"build_app needs a RayMoEConfig or a dict, got {type(config).__name__}")
    try:
        return RayMoEConfig.model_validate(config or {})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "<root>"
            value = f" = {err['input']!r}" if err["type"] != "missing" and where != "<root>" else ""
            problems.append(f"{where}{value}: {err['msg']}")
        raise ValueError("invalid raymoe config: " + "; ".join(problems)) from None


def deployment_options(cfg: DeploymentConfig) -> dict[str, Any]:
    """Serve `.options()` for one deployment from its `DeploymentConfig`."""
    auto = cfg.autoscaling
    autoscaling: dict[str, Any] = {
        "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
        "target_ongoing_requests": auto.target_ongoing_requests,
        "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s,
        "metrics_interval_s": auto.metrics_interval_s, "look_back_period_s": auto.look_back_period_s,
    }
    if auto.initial_replicas is not None:
        autoscaling["initial_replicas"] = auto.initial_replicas
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.resources:
        actor["resources"] = dict(cfg.resources)
    return {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        # Serve's -1 means unbounded; the config allows it, but it is never the default (no unbounded queues).
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": cfg.backpressure_status_code, "retry_after_s": cfg.retry_after_s},
        "ray_actor_options": actor,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }


def build_app(config: RayMoEConfig | dict[str, Any] | None = None, *, engine_factory: str | None = None) -> Application:
    """Build the raymoe Serve application: an OpenAI ingress over an autoscaled attention tier.

    Args:
        config: a `RayMoEConfig`, or the plain dict of a Serve YAML / KubeRay `args` block.
        engine_factory: import path `'pkg.module:fn'` of `fn(config) -> engine` used by every
            AttentionTier replica instead of the real engine (tests).

    Returns:
        The application for `serve.run`.

    Raises:
        ValueError: the config is invalid (each bad field and value named).

    Examples:
        >>> from ray import serve
        >>> serve.run(build_app({"model": {"preset": "tiny"}}), route_prefix="/")  # doctest: +SKIP
    """
    cfg = validate_config(config)
    serve_cfg = cfg.serve
    tier = AttentionTier.options(**deployment_options(serve_cfg.attention)).bind(cfg, engine_factory)
    return OpenAiIngress.options(**deployment_options(serve_cfg.ingress)).bind(tier, serve_cfg)
