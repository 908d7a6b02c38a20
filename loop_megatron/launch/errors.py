"""The one exception of the launch helpers."""

from ..errors import LoopMegatronError


class LaunchError(LoopMegatronError):
    """A launch that cannot work; the message is one sentence naming the file, line or option."""
