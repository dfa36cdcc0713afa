"""Orchestration, above the roles: role groups (N actors of one role), placement, launch, the Ray session, the
dry-run plan, the driver-side weight push, and the groups of learners the offline stages start.

Submodules are imported explicitly (``from rlhf_dist.orchestration.role_group import ...``); importing this package
imports nothing.
"""
