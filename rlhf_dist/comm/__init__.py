"""Communication plumbing below the roles and engines: the torch.distributed / DeepSpeed process group a learner
role's actors train in, and the errors an actor raises about its own state (errors.py). Importing it does not import
Ray or DeepSpeed.
"""
