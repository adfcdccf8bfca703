"""The proof at startup that every process of a job sees one run.dir: process 0 writes a token there, all read it back;
a relative or node-local run.dir on several hosts stops all of them here rather than at the first checkpoint."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

import jax

from maxlm.core import files
from maxlm.core.errors import ConfigError

TOKEN_FILE = "maxlm.token"  # written by process 0 at startup, read by all, then removed
TOKEN_KEY = "maxlm/run_dir/token"
SEEN_KEY = "maxlm/run_dir/seen/{}"
TIMEOUT_MS = 5 * 60 * 1000


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def check_same_run_dir(run_dir: str) -> None:
  """Process 0 writes a fresh token to run_dir/maxlm.token and publishes it in jax.distributed's key-value store;
  every process reads the file back and reports what it read. Any process that read nothing or another token makes
  all of them raise the same ConfigError, naming those processes, their hosts and the paths they resolved."""
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return
  client, me = _client(), jax.process_index()
  path = os.path.join(run_dir, TOKEN_FILE)
  if me == 0:
    token = secrets.token_hex(16)
    files.write_atomic(path, token)
    client.key_value_set(TOKEN_KEY, token)
  expected = client.blocking_key_value_get(TOKEN_KEY, TIMEOUT_MS)
  seen = None
  for _ in range(20):  # a shared filesystem may show a new file a moment late (NFS attribute caching)
    try:
      seen = files.read_text(path)
      if seen == expected:
        break
    except OSError:
      pass
    time.sleep(0.25)
  verdict = "same" if seen == expected else ("no token" if seen is None else "another token")
  client.key_value_set(SEEN_KEY.format(me), json.dumps([verdict, socket.gethostname(), files.absolute(run_dir)]))
  reports = [json.loads(client.blocking_key_value_get(SEEN_KEY.format(p), TIMEOUT_MS))
             for p in range(jax.process_count())]
  if me == 0:
    files.remove(path)  # every process has read it (each reported above)
  blind = [f"process {p} on host {host} ({verdict} in {where})"
           for p, (verdict, host, where) in enumerate(reports) if verdict != "same"]
  if blind:
    raise ConfigError(
        f"run.dir {run_dir} is not one directory for all {jax.process_count()} processes: process 0 on host "
        f"{reports[0][1]} wrote a token to {files.absolute(path)}, and {'; '.join(blind)} did not read it back. "
        "Checkpoints and metrics need one run.dir that every host sees: use gs://BUCKET/PATH or an absolute path on "
        "a filesystem every host mounts (NFS, gcsfuse); a relative or node-local path is another directory on each "
        "host")
