"""Training engines: one interface (TrainEngine), two backends (DeepSpeed ZeRO 0-3, plain torch).

Importing this package does not import DeepSpeed; ``make_train_engine`` loads the backend it is asked for.
"""

from rlhf_dist.engines.training.base import TrainEngine, TrainOptions, make_train_engine

__all__ = ["TrainEngine", "TrainOptions", "make_train_engine"]
