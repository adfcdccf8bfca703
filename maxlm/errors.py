"""User-facing errors: every mistake a user can make raises one of these, with the fix in its message.

CLIs catch MaxlmError, print the message without a traceback and exit non-zero.
"""


class MaxlmError(Exception):
  """Base class: an error caused by input the user controls."""


class ConfigError(MaxlmError):
  """A bad config key, value or combination."""


class DataError(MaxlmError):
  """Missing or malformed data, tokenizer or store."""


class CheckpointError(MaxlmError):
  """A missing, partial or incompatible checkpoint."""


class ConversionError(MaxlmError):
  """An unsupported architecture or a shape/vocab mismatch during HF conversion."""


class TrainingDivergedError(MaxlmError):
  """The loss or gradient became NaN/Inf."""
