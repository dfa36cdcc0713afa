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


@pytest.fixture
def local_ray():
    """Embedded Ray on loopback, always shut down, also when the test fails."""
    import ray

    from rlhf_dist.orchestration.cluster import init_local

    init_local(num_cpus=8)
    try:
        yield ray
    finally:
        ray.shutdown()
