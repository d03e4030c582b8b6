"""`mtv-train CONFIG [key=value ...]`: train a multi-task model (single process or under torchrun)."""

from __future__ import annotations

import argparse
import sys

from mtvision.cli.common import run_config_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-train",
        description="Train a multi-task model from a YAML config. Multi-GPU: torchrun --nproc_per_node=N tools/train.py CONFIG",
    )
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.iterations=500")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtvision.config import ExperimentConfig, load_config
    from mtvision.engine.trainer import train

    def run() -> None:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite, device=args.device)

    return run_config_command("mtv-train", args.overrides, "optim.lr=1e-3", run)


if __name__ == "__main__":
    sys.exit(main())
