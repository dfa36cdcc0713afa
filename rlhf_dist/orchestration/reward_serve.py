"""``reward.serve``: the driver deploys the reward model as a Ray Serve application before the roles start, or shares
one already running under ``reward.serve.name`` (another job's, or ``rlhf-dist serve-reward``'s) once it has checked
that it serves the same model. An application the job started is deleted when the job ends; one it found is left.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from rlhf_dist.config import ConfigError, RunConfig
from rlhf_dist.engines.served_reward import RewardModelServer, ServedRewardError, import_serve
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.orchestration.cluster import ray_session, worker_env

DEPLOYMENT = "RewardModel"


def serve_cpus(cfg: RunConfig) -> float:
    """CPUs the replicas take at first (the fewest, when autoscaling); 0 when reward.serve is off."""
    s = cfg.reward.serve
    return s.replicas * s.num_cpus if s.enabled else 0.0


@contextmanager
def served_reward(cfg: RunConfig, reserved: dict[str, float]):
    """With ``reward.serve.enabled``: the application is running inside, and gone afterwards if this job started it
    (also after an error). ``reserved``: what the roles will take, which the replicas must leave free."""
    if not cfg.reward.serve.enabled:
        yield
        return
    started = deploy(cfg, reserved)
    try:
        yield
    finally:
        if started:
            import_serve().delete(cfg.reward.serve.name)


def deploy(cfg: RunConfig, reserved: dict[str, float]) -> bool:
    """Start the application, or check and reuse the running one; True when this call started it."""
    s = cfg.reward.serve
    check_model(cfg)
    serve = import_serve()
    if s.name in serve.status().applications:
        wait_running(cfg)
        check_same_model(cfg, serve.get_app_handle(s.name).describe.remote().result(timeout_s=s.timeout_s))
        print(f"reward.serve: sharing the running application {s.name!r}", flush=True)
        return False
    check_room(cfg, reserved)
    serve.start(proxy_location="Disabled")  # handles only: no HTTP port opened (an existing Serve keeps its own)
    serve.run_many(
        [serve.RunTarget(application(cfg), name=s.name, route_prefix=None)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    try:
        wait_running(cfg)
    except BaseException:
        serve.delete(s.name)
        raise
    scaling = f"{s.replicas}..{s.max_replicas} replicas" if s.max_replicas else f"{s.replicas} replicas"
    print(f"reward.serve: application {s.name!r} serves {cfg.model.reward} on {scaling}", flush=True)
    return True


def check_model(cfg: RunConfig) -> None:
    if not cfg.model.reward:
        raise ConfigError(
            "model.reward",
            "not set, but reward.serve serves the reward model; set model.reward=PATH (or reward.serve.enabled=false)",
        )


def application(cfg: RunConfig):
    """The Serve application: RewardModelServer with the replicas, resources and autoscaling of ``reward.serve``."""
    s = cfg.reward.serve
    if s.max_replicas is None:
        scaling = {"num_replicas": s.replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": s.replicas,
                "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests,
            }
        }
    deployment = import_serve().deployment(
        RewardModelServer,
        name=DEPLOYMENT,
        ray_actor_options={
            "num_cpus": s.num_cpus,
            "num_gpus": s.num_gpus,
            "runtime_env": {"env_vars": worker_env()},
        },
        max_constructor_retry_count=2,  # a model that does not load fails the deploy, not 20 retries later
        **scaling,
    )
    pad_token_id = load_tokenizer(cfg.model.tokenizer or cfg.model.policy).pad_token_id
    return deployment.bind(cfg.model.reward, cfg.model.dtype, pad_token_id, max(1, round(s.num_cpus)))


def wait_running(cfg: RunConfig) -> None:
    """Until the application is RUNNING; a failed deploy or ``ray.actor_timeout_s`` is one line with Serve's reason."""
    serve, name = import_serve(), cfg.reward.serve.name
    t0 = time.monotonic()
    while True:
        app = serve.status().applications.get(name)
        status = app.status if app is not None else "NOT_STARTED"
        if status == "RUNNING":
            return
        waited = time.monotonic() - t0
        if status in ("DEPLOY_FAILED", "UNHEALTHY", "NOT_STARTED") or waited > cfg.ray.actor_timeout_s:
            lines = [line.strip() for line in (app.message if app is not None else "").splitlines() if line.strip()]
            reason = lines[-1][:300] if lines else "no message"
            raise ServedRewardError(
                f"reward.serve.name={name!r}: the Serve application is {status} after {waited:.0f} s "
                f"(ray.actor_timeout_s={cfg.ray.actor_timeout_s:g}): {reason}"
            )
        time.sleep(0.25)


def check_same_model(cfg: RunConfig, served: dict) -> None:
    want = {"model": str(Path(cfg.model.reward).resolve()), "dtype": cfg.model.dtype}
    if served != want:
        raise ConfigError(
            "reward.serve.name",
            f"{cfg.reward.serve.name!r} is running with {served['model']} ({served['dtype']}), not model.reward="
            f"{want['model']} ({want['dtype']}); choose another reward.serve.name, or point model.reward at that model",
        )


def check_room(cfg: RunConfig, reserved: dict[str, float], wait_s: float = 10.0) -> None:
    """The replicas fit beside the roles; Serve would otherwise wait for resources that never come. Ray gives back
    what an earlier job in the same session released a moment later, so a shortfall is looked at again for up to
    ``wait_s`` seconds before it is an error."""
    s, deadline = cfg.reward.serve, time.monotonic() + wait_s
    for resource, key, per_replica in (("CPU", "num_cpus", s.num_cpus), ("GPU", "num_gpus", s.num_gpus)):
        need = s.replicas * per_replica
        while need > (room := ray.available_resources().get(resource, 0.0) - reserved.get(resource, 0.0)) + 1e-9:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise ConfigError(
                f"reward.serve.{key}",
                f"{s.replicas} replicas x {per_replica:g} = {need:g} {resource}s, but Ray has {max(room, 0):g} free "
                f"beside the roles' {reserved.get(resource, 0.0):g}; lower reward.serve.replicas or "
                f"reward.serve.{key}, or give Ray more (ray.num_cpus=null on local Ray counts them in)",
            )


def serve_reward(cfg: RunConfig) -> int:
    """``rlhf-dist serve-reward CONFIG``: the application, for jobs on the same cluster (``ray.address``) to share,
    until Ctrl-C; then it is deleted if this command started it."""
    s = dataclasses.replace(cfg.reward.serve, enabled=True)
    cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, serve=s))
    check_model(cfg)
    with ray_session(cfg, min_cpus=serve_cpus(cfg)), served_reward(cfg, reserved={}):
        print(
            f"reward.serve: jobs with reward.serve.enabled=true reward.serve.name={s.name} on this cluster share it; "
            "Ctrl-C to stop",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0
