"""The typed configuration of one run: schema, loading with overrides, validation.

cfg = load_config("configs/tiny_cpu.yaml", ["train.iterations=3", "train.policy_lr=1e-5"])
"""

from .coerce import config_to_dict, from_dict
from .errors import ConfigError, ConfigFileNotFoundError
from .loading import DEFAULT_CONFIG, apply_override, dump_yaml, load_config, read_yaml
from .schema import (
    ROLE_TABLE,
    AlgoConfig,
    CheckpointConfig,
    DataConfig,
    GenerationConfig,
    LoggingConfig,
    ModelConfig,
    RayConfig,
    RewardConfig,
    RoleConfig,
    RolesConfig,
    RoleSpec,
    RunConfig,
    SyncConfig,
    TrainConfig,
)
from .validate import check_imports, check_paths, resolve_function, validate

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "ConfigFileNotFoundError",
    "apply_override",
    "config_to_dict",
    "dump_yaml",
    "from_dict",
    "load_config",
    "read_yaml",
    "AlgoConfig",
    "CheckpointConfig",
    "DataConfig",
    "GenerationConfig",
    "LoggingConfig",
    "ModelConfig",
    "RayConfig",
    "RewardConfig",
    "ROLE_TABLE",
    "RoleConfig",
    "RolesConfig",
    "RoleSpec",
    "RunConfig",
    "SyncConfig",
    "TrainConfig",
    "check_imports",
    "check_paths",
    "resolve_function",
    "validate",
]
