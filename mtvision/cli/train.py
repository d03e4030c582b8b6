"""`mtv-train CONFIG [key=value ...]`: train a multi-task model (single process or under torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtvision.cli.common import parse, run_command

EXAMPLES = """examples:
  mtv-train configs/synthetic/hps_resnet18_128x160.yaml
  mtv-train configs/synthetic/hps_resnet18_128x160.yaml --overwrite optim.lr=1e-3 train.iterations=2000
  mtv-train configs/synthetic/hps_resnet18_128x160.yaml --resume            # after Ctrl-C / SIGTERM
  mtv-train configs/synthetic/hps_resnet18_128x160.yaml --resume runs/x/checkpoints/step_000400
  torchrun --nproc_per_node=4 tools/train.py configs/nyud/hps_vitl16_448x576.yaml
exit codes: 0 done (or stopped by a signal after saving), 2 bad arguments or config, 1 runtime failure, 130 force-quit"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-train",
        description="Train a multi-task model from a YAML config. Multi-GPU: torchrun --nproc_per_node=N tools/train.py CONFIG",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.iterations=500")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the run in output_dir from its last checkpoint, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a checkpoint
        args.resume = True
    from mtvision.config import ExperimentConfig, load_config
    from mtvision.engine.trainer import train

    def run() -> None:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device)

    return run_command("mtv-train", run, args.overrides, "optim.lr=1e-3")


if __name__ == "__main__":
    sys.exit(main())
