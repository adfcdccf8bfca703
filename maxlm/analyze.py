"""`python -m maxlm.analyze TOOL ...`: the thin CLI over the research tools in maxlm.analysis (one subcommand each).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from maxlm.core import host
from maxlm.core.errors import cli_description, cli_exit_code


def build_parser() -> argparse.ArgumentParser:
  from maxlm import analysis  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m maxlm.analyze", description=cli_description(__doc__))
  sub = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")
  for name in analysis.TOOLS:
    importlib.import_module(f"maxlm.analysis.{name}").add_parser(sub)
  return parser


def main(argv: Optional[list[str]] = None) -> int:
  args = build_parser().parse_args(argv)

  def body():
    if argv is None:  # the process is this CLI: tune its allocator before jax creates the CPU client's threads
      host.tune_cpu_malloc()
    return args.func(args)

  return cli_exit_code(body)


if __name__ == "__main__":
  sys.exit(main())
