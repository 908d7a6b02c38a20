"""The one error base of loop_megatron: `LoopMegatronError`.

`LoopMegatronError` (a ValueError) means bad input or a setting that cannot work; its message is one
sentence naming the file, line or field, so a command line prints it as-is (``error: <sentence>``) and
exits non-zero instead of showing a traceback. Every package has its own subclass, kept so that a caller
can still catch one package's errors by name::

    LoopMegatronError(ValueError)
        ConfigError          config.py
        DataError            data/errors.py       (SourceUnavailable in data/sources.py)
        CheckpointError      checkpoint/layout.py   (CheckpointWriteError, SaveFolderBusy)
        UniversalError       checkpoint/universal.py
        NonFiniteStepError   training/step.py
        LaunchError          launch/errors.py
        ConversionError      hf/convert.py
        ExperimentError      experiments/records.py

A function that calls into another package lets that package's error pass through unchanged (no
``except DataError: raise ConfigError(str(exc))``); it catches one only to add what the sentence would
otherwise lack (the field it came from). Command lines catch the base once.

Decision: this module imports nothing, from the package or outside the standard library, and
config.py takes the base with the relative import ``from .errors import LoopMegatronError``. config.py
stays importable with the standard library alone wherever it is copied (e.g. into a Hugging Face export
folder) as long as this file is copied beside it; copying the base into config.py instead would give
two classes of that name, and `except LoopMegatronError` would miss the config's errors.
"""


class LoopMegatronError(ValueError):
    """Bad input or a setting that cannot work; the message is one sentence naming the file, line or field."""
