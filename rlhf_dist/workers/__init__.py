"""The roles of the RLHF loop as plain classes; ``rlhf_dist.distributed`` turns them into Ray actors."""
