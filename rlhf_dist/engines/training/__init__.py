"""Training engines: one interface (TrainEngine), two backends (DeepSpeed ZeRO 0-3, plain torch).

Importing this package does not import DeepSpeed: the DeepSpeed backend imports it only when an engine is built.
"""

from rlhf_dist.engines.training.base import TrainEngine, TrainOptions
from rlhf_dist.engines.training.factory import make_train_engine

__all__ = ["TrainEngine", "TrainOptions", "make_train_engine"]
