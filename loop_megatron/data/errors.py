"""The one exception type the data pipeline raises for bad input."""

from ..errors import LoopMegatronError


class DataError(LoopMegatronError):
    """Bad or missing data: the message is one sentence naming the file, line or field.

    Raised instead of letting numpy, json or struct crash deep inside a reader, so that command-line
    tools can print the message as-is and exit non-zero.
    """
