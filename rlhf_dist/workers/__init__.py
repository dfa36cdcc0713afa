"""The roles of the RLHF loop as plain classes; ``rlhf_dist.orchestration`` turns them into Ray actors."""
