"""Distribution plumbing: RoleGroup (actors of one role), placement, process-group setup.

Submodules are imported explicitly (``from rlhf_dist.distributed.process_group import ...``) so importing this
package pulls in neither Ray nor DeepSpeed.
"""
