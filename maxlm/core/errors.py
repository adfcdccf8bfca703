"""User-facing errors: every mistake a user can make raises one of these, with the fix in its message.

CLIs run their body through `cli_exit_code`: a MaxlmError prints its message without a traceback, exit code 2.
"""

import logging
import os
import sys
from typing import Any, Callable

# Libraries that log their own tracebacks when a checkpoint save or restore fails (orbax through absl, tensorstore's
# event loops through asyncio); maxlm reports the failure itself, with the fix, so theirs are cut to one line.
_NOISY_LOGGERS = ("absl", "asyncio")


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


def resolved_from(path: str) -> str:
  """For a message about a missing path: where a relative one was looked for (empty for an absolute path)."""
  return "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"


def _close_progress_bars() -> None:
  """Ends any open tqdm bar so that what follows starts on its own line."""
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  for bar in list(getattr(tqdm, "_instances", ())):
    bar.close()


class _OneLine(logging.Filter):
  """Keeps a library's error records to one line: no traceback, message cut at 300 characters."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info or record.exc_text or record.stack_info:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    message = record.getMessage().splitlines()[0] if record.getMessage() else ""
    record.msg, record.args = (message[:300] + (" ..." if len(message) > 300 else "")), None
    return True


def _one_line_unraisable(unraisable) -> None:
  # Exceptions Python can only ignore (a library's event loop torn down at exit after a failed save): one line each.
  error = unraisable.exc_value
  line = f"{type(error).__name__}: {error}" if error is not None else str(unraisable.err_msg)
  print(f"maxlm: ignored at shutdown: {line.splitlines()[0][:300] if line else ''}", file=sys.stderr)


def quiet_library_tracebacks() -> None:
  for name in _NOISY_LOGGERS:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OneLine) for f in logger.filters):
      logger.addFilter(_OneLine())
  sys.unraisablehook = _one_line_unraisable


def cli_description(doc: str) -> str:
  """A module docstring's first paragraph as one line: an argparse description that does not stop mid-sentence."""
  return " ".join((doc or "").strip().split("\n\n")[0].split())


def cli_exit_code(body: Callable[[], Any]) -> int:
  """Runs a CLI's body: 0 when it returns, 2 (after printing the message, no traceback) on a MaxlmError, 130 on
  Ctrl-C outside the training loop (which handles it itself)."""
  quiet_library_tracebacks()
  try:
    body()
  except MaxlmError as e:
    _close_progress_bars()
    print(f"\nmaxlm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    _close_progress_bars()
    print("\nmaxlm: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # stdout closed by its reader (`... | head`): what was read is all that was wanted
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with  (the interpreter flushes it at exit)
    return 0
  return 0
