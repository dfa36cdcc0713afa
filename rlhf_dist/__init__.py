"""rlhf_dist: distributed actor-based RLHF on Ray."""

__version__ = "0.1.0"
