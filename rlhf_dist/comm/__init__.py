"""Communication plumbing below the roles and engines: the torch.distributed / DeepSpeed process group a learner
role's actors train in. Importing it does not import Ray or DeepSpeed.
"""
