"""`python -m maxlm.train --config=NAME [key=value ...] [--dry-run]`: the thin CLI over maxlm.run (setup, then a loop
of steps and hooks); `train(cfg)` is what the CLI and tests call."""

from __future__ import annotations

import argparse
import sys

import jax

from maxlm.core import host
from maxlm.core.config import check_command_line_overrides, load_config, preset_names
from maxlm.core.errors import ConfigError, cli_description, cli_exit_code
from maxlm.run.loop import train
from maxlm.state import plan


# ----------------------------------------------------------------------------- CLI


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m maxlm.train", description=cli_description(__doc__),
      epilog=f"presets: {', '.join(preset_names())}. Every config key, with its default and choices, is listed in "
             "configs/base.yaml (installed as maxlm/configs/base.yaml); override any with section.key=value.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="demo", help="preset name (see the list below) or a path to a YAML file "
                                                        "(which may `inherit:` a preset)")
  parser.add_argument("--dry-run", action="store_true",
                      help="build the model abstractly, print parameter count and per-device memory, exit")
  parser.add_argument("--devices", type=int, default=None,
                      help="with --dry-run: the device count to plan for (default: the devices present)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host; see launch/); on SLURM, TPU pods and "
                           "Kubernetes the cluster is detected, elsewhere pass the three flags below")
  parser.add_argument("--coordinator-address", default=None, help="with --distributed: host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
  parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
  parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 optim.lr=1e-3")
  return parser.parse_args(argv)


def check_flags(args) -> None:
  """ConfigErrors for command lines that would silently ignore what they say: a key given twice, --devices without
  --dry-run, the distributed flags without --distributed."""
  check_command_line_overrides(args.overrides)
  if args.devices is not None and not args.dry_run:
    raise ConfigError("--devices plans a --dry-run for that many devices; a run uses the devices present (for "
                      "simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  given = [f for f, v in (("--coordinator-address", args.coordinator_address), ("--num-processes",
                          args.num_processes), ("--process-id", args.process_id)) if v is not None]
  if given and not args.distributed:
    raise ConfigError(f"{', '.join(given)} take effect with --distributed: add it (or drop them)")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  outcome = {}

  def body():
    check_flags(args)
    if argv is None:  # the process is this CLI: tune its allocator before jax creates the CPU client's threads
      host.tune_cpu_malloc()
    if args.distributed:
      jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                 process_id=args.process_id)
    if args.dry_run:
      n = args.devices or jax.device_count()
      print(plan.dry_run_report(load_config(args.config, args.overrides, num_devices=n), n))
      return
    outcome.update(train(load_config(args.config, args.overrides, num_devices=jax.device_count())))

  code = cli_exit_code(body)
  return 130 if code == 0 and outcome.get("stop_signal") == "SIGINT" else code


if __name__ == "__main__":
  sys.exit(main())
