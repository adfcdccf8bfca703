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


# Teardown noise after a failed checkpoint save (a full disk): tensorstore/orbax's asyncio loops are already closed
# when their pending callbacks and transports are collected at exit, each saying so once. maxlm has reported the
# failure itself; these say nothing more.
_TEARDOWN_NOISE = ("Event loop is closed",)


def _is_teardown_noise(line: str) -> bool:
  return any(noise in line for noise in _TEARDOWN_NOISE)


class _OneLine(logging.Filter):
  """Keeps a library's error records to one line: no traceback, message cut at 300 characters; teardown noise and
  repeats of a line already shown are dropped."""

  def __init__(self):
    super().__init__()
    self.seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if record.exc_info or record.exc_text or record.stack_info:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    message = record.getMessage().splitlines()[0] if record.getMessage() else ""
    if _is_teardown_noise(message) or (error is not None and _is_teardown_noise(str(error))) or message in self.seen:
      return False
    self.seen.add(message)
    record.msg, record.args = (message[:300] + (" ..." if len(message) > 300 else "")), None
    return True


_SHOWN_AT_SHUTDOWN: set[str] = set()


def _one_line_unraisable(unraisable) -> None:
  # Exceptions Python can only ignore (a library's event loop torn down at exit after a failed save): one line for
  # each distinct one, none for a closed event loop.
  error = unraisable.exc_value
  line = f"{type(error).__name__}: {error}" if error is not None else str(unraisable.err_msg)
  line = line.splitlines()[0][:300] if line else ""
  if _is_teardown_noise(line) or line in _SHOWN_AT_SHUTDOWN:
    return
  _SHOWN_AT_SHUTDOWN.add(line)
  print(f"maxlm: ignored at shutdown: {line}", file=sys.stderr)


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
