"""The one error type of the config package: every failure names the key, the bad value and the fix, on one line."""


class ConfigError(ValueError):
    """A bad config: ``key`` is the dotted path (None when the problem is not one key)."""

    def __init__(self, key: str | None, message: str):
        self.key = key
        text = f"{key}: {message}" if key else message
        super().__init__(" ".join(text.split()))  # one line, whatever went into it


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file itself is missing; catchable as either parent."""
