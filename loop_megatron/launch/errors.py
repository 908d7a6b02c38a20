"""The one exception of the launch helpers."""


class LaunchError(ValueError):
    """A launch that cannot work; the message is one sentence naming the file, line or option."""
