import os

# Tests never open a Ray port beyond loopback and never need Ray's token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny Llama-style model and tokenizer, built once and loaded through from_pretrained like any model."""
    from rlhf_dist.models.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture
def tiny_cfg(tiny_model, tmp_path):
    """The embedded default config pointed at the session's tiny model and a fresh output dir."""
    from rlhf_dist.config import load_config

    def make(*overrides, path="configs/tiny_cpu.yaml"):
        return load_config(
            path,
            [f"model.policy={tiny_model}", f"output_dir={tmp_path / 'run'}", "logging.progress_bar=false", *overrides],
        )

    return make


@pytest.fixture(scope="module")
def _embedded_ray():
    """One embedded Ray for consecutive tests of a module that ask for ``local_ray`` (its start and stop cost ~5 s a
    test); shut down after the module's last test at the latest, so no fixture of another module finds it."""
    import ray

    try:
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(autouse=True)
def _no_embedded_ray_unasked(request):
    """A test that does not ask for ``local_ray`` finds no Ray running, as if each test started its own."""
    if "local_ray" not in request.fixturenames:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so a fixture can see whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def local_ray(_embedded_ray, request):
    """Embedded Ray on loopback, shared with the previous test only if that one left nothing behind (no actor,
    placement group or resource still held); otherwise, or if the test failed, shut down after it."""
    from rlhf_dist.orchestration.cluster import init_local

    ray = _embedded_ray
    if not ray.is_initialized():
        init_local(num_cpus=8)
    clean = False
    try:
        yield ray
        passed = getattr(request.node, "report_call", None) is not None and request.node.report_call.passed
        clean = passed and _left_nothing_behind(ray)
    finally:
        if not clean:
            ray.shutdown()


@pytest.fixture
def role_groups(local_ray):
    """``local_ray`` and a list for the RoleGroups a test starts by hand: stopped after it (actors killed, placement
    groups removed), so the next test finds Ray empty and keeps it instead of restarting it (~8 s)."""
    from rlhf_dist.orchestration.launch import stop_roles

    groups: list = []
    yield groups
    stop_roles({str(i): g for i, g in enumerate(groups)})


def _left_nothing_behind(ray, wait_s: float = 3.0) -> bool:
    """Whether every actor is dead, every placement group removed and every CPU and GPU free (killed actors take a
    moment to release theirs)."""
    import time

    from ray._private import state

    deadline = time.monotonic() + wait_s
    while True:
        actors_dead = all(a["State"] == "DEAD" for a in state.actors().values())
        groups_removed = all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
        total, available = ray.cluster_resources(), ray.available_resources()
        free = all(available.get(r) == total[r] for r in ("CPU", "GPU") if r in total)
        if actors_dead and groups_removed and free:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
