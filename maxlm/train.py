"""`python -m maxlm.train --config=NAME [key=value ...] [--dry-run]`: the thin CLI over maxlm.run (setup, then a loop
of steps and hooks); `train(cfg)` is what the CLI and tests call."""

from __future__ import annotations

import argparse
import sys

import jax

from maxlm.core import compilers, host
from maxlm.core.config import check_command_line_overrides, load_config, preset_names
from maxlm.core.errors import ConfigError, cli_description, cli_exit_code
from maxlm.run import hosts
from maxlm.run.loop import train
from maxlm.state import layout as state_layout
from maxlm.state import plan, target_compile


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
  parser.add_argument("--topology", default=None, metavar="SLICE",
                      help="with --dry-run: compile the real train and eval steps for a TPU slice (v4-N, v5e-N, v5p-N, "
                           "v6e-N: Cloud TPU accelerator types) or GPUs (h100-N, h200-N, a100-N; 8 per host) on this "
                           "machine and report per-chip memory against HBM and the kernels the program holds")
  parser.add_argument("--install-compilers", default=None, metavar="KINDS",
                      help="install the XLA compilers --topology uses (tpu,gpu or one of them) into "
                           "$MAXLM_COMPILERS (default ~/.cache/maxlm/compilers), matched to this jaxlib, then exit")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host; see launch/); on SLURM, TPU pods and "
                           "Kubernetes the cluster is detected, elsewhere pass the three flags below")
  parser.add_argument("--coordinator-address", default=None, help="with --distributed: host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: number of processes")
  parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
  parser.add_argument("--coordinator-port", type=int, default=None,
                      help="with --distributed: the coordinator's port, replacing the one detected (JAX's SLURM port "
                           "61440 + job id %% 4096 is shared by two steps of one allocation; give each its own)")
  parser.add_argument("--init-timeout", type=int, default=300, metavar="S",
                      help="with --distributed: seconds for every process to reach the coordinator (default 300)")
  parser.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                      help="with --distributed: seconds without a heartbeat after which a peer counts as dead and the "
                           "job stops (default 100)")
  parser.add_argument("--preempt-exit-code", type=int, default=0, metavar="N",
                      help="the exit status when a SIGTERM (preemption, a time limit) stopped the run before "
                           "train.steps and the checkpoint was saved (default 0); launchers that restart or requeue "
                           "on it set one, e.g. 143 (launch/)")
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
                          args.num_processes), ("--process-id", args.process_id),
                          ("--coordinator-port", args.coordinator_port)) if v is not None]
  if given and not args.distributed:
    raise ConfigError(f"{', '.join(given)} take effect with --distributed: add it (or drop them)")
  if args.topology is not None and not args.dry_run:
    raise ConfigError(f"--topology={args.topology} compiles for that target with --dry-run: add it (a run uses the "
                      "devices present)")
  if not 0 <= args.preempt_exit_code <= 255:
    raise ConfigError(f"--preempt-exit-code={args.preempt_exit_code} must be an exit status in 0..255 (e.g. 143)")
  if args.topology is not None and args.devices is not None:
    raise ConfigError("--topology sets the device count (its chips): drop --devices")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  outcome = {}

  def body():
    check_flags(args)
    if args.install_compilers is not None:
      compilers.install([k.strip() for k in args.install_compilers.split(",") if k.strip()])
      return
    if argv is None:  # the process is this CLI: tune its allocator before jax creates the CPU client's threads
      host.tune_cpu_malloc()
    if args.distributed:
      hosts.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                       process_id=args.process_id, coordinator_port=args.coordinator_port,
                       init_timeout_s=args.init_timeout, heartbeat_timeout_s=args.heartbeat_timeout)
    if args.topology is not None:
      outcome["code"] = target_compile.dry_run(args.config, args.overrides, args.topology,
                                               sys.argv[1:] if argv is None else argv)
      return
    if args.dry_run:
      n = args.devices or jax.device_count()
      cfg = load_config(args.config, args.overrides, num_devices=n)
      taken, note = state_layout.planned_architecture(cfg, n)
      report = plan.dry_run_report(cfg, n)
      if jax.process_index() == 0:  # one report per job
        if note and not taken:
          print(f"maxlm: warning: {note}", file=sys.stderr)
        print(report + (f"\n{note}" if taken else ""))
      return
    cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
    hosts.check_same_config(cfg)  # under --distributed: one config, or every process stops naming the keys
    outcome.update(train(cfg))

  code = cli_exit_code(body) or outcome.get("code", 0)
  if code == 0 and outcome.get("stop_signal") == "SIGINT":
    return 130
  return args.preempt_exit_code if code == 0 and outcome.get("stop_signal") == "SIGTERM" else code


if __name__ == "__main__":
  sys.exit(main())
