"""`mtv-search CONFIG [key=value ...]`: search a branching tree (BMTAS or Learning to Branch) and
write the spec, the architecture parameters per epoch and their plot, the expected FLOPs and a
ready-to-train config (single process or under torchrun)."""

from __future__ import annotations

import argparse
import sys

from mtvision.cli.common import run_config_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-search",
        description="Search which backbone stages the tasks share, from a YAML search config (see configs/search/). "
        "Multi-GPU: torchrun --nproc_per_node=N tools/search.py CONFIG",
    )
    parser.add_argument("config", help="search YAML (see configs/search/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.epochs=5 search.target_flops=2e9")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in output_dir")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtvision.config import load_config
    from mtvision.search.config import SearchConfig
    from mtvision.search.runner import search

    def run() -> None:
        cfg = load_config(SearchConfig, args.config, args.overrides)
        search(cfg, overwrite=args.overwrite, device=args.device)

    return run_config_command("mtv-search", args.overrides, "search.epochs=5", run)


if __name__ == "__main__":
    sys.exit(main())
