"""`mtv-search CONFIG [key=value ...]`: search a branching tree (BMTAS or Learning to Branch) and
write the spec, the architecture parameters per epoch and their plot, the expected FLOPs and a
ready-to-train config (single process or under torchrun)."""

from __future__ import annotations

import argparse
import sys

from mtvision.cli.common import parse, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtv-search",
        description="Search which backbone stages the tasks share, from a YAML search config (see configs/search/). "
        "Multi-GPU: torchrun --nproc_per_node=N tools/search.py CONFIG",
        epilog="example: mtv-search configs/search/bmtas_resnet18_synthetic.yaml search.epochs=4 --overwrite\n"
        "exit codes: 0 done, 2 bad arguments or config, 1 runtime failure, 130 force-quit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="search YAML (see configs/search/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.epochs=5 search.target_flops=2e9")
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in output_dir")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    from mtvision.config import load_config
    from mtvision.search.config import SearchConfig
    from mtvision.search.runner import search

    def run() -> None:
        cfg = load_config(SearchConfig, args.config, args.overrides)
        search(cfg, overwrite=args.overwrite, device=args.device)

    return run_command("mtv-search", run, args.overrides, "search.epochs=5")


if __name__ == "__main__":
    sys.exit(main())
