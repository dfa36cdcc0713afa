"""What an actor raises to tell the role group about its own state, rather than about the call's input."""


class StaleStateError(RuntimeError):
    """The actor lacks state the run gave it earlier (a rollout engine that Ray restarted holds the weights on disk,
    not the current ones): the role group restores the actor (``RoleGroup.on_restart``) and sends the call again."""
