"""`mtv-list [PATTERN]`: what mtvision can build and convert: decoders, backbone families, shipped configs
and the released checkpoint formats, with one line each."""

from __future__ import annotations

import argparse
import shutil
import sys

from mtvision.cli.common import USAGE

TITLES = {
    "decoders": "decoders (model.decoder)",
    "backbones": "backbone families (model.backbone.name: any timm name of the family)",
    "configs": "shipped configs (mtv-train configs/<name>)",
    "released": "released checkpoints (mtv-convert --format <name>)",
}

EXAMPLES = """examples:
  mtv-list                      everything
  mtv-list mamba                names containing 'mamba', of every kind
  mtv-list 'nyud/*' --kind configs
  mtv-list --kind released --names-only"""


def build_parser() -> argparse.ArgumentParser:
    from mtvision import LIST_KINDS

    parser = argparse.ArgumentParser(
        prog="mtv-list",
        description="List the decoders, supported backbone families, shipped configs and convertible released "
        "checkpoints of mtvision.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pattern", nargs="?", default=None,
                        help="shell-style pattern (e.g. '*vit*') or a substring, case-insensitive")
    parser.add_argument("--kind", choices=[*LIST_KINDS, "all"], default="all", help="what to list (default: all)")
    parser.add_argument("--names-only", action="store_true", help="one name a line, no titles or descriptions")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mtvision import LIST_KINDS, catalog

    args = build_parser().parse_args(argv)
    kinds = LIST_KINDS if args.kind == "all" else (args.kind,)
    found = catalog(args.pattern, kinds)
    if not any(found.values()):
        print(f"mtv-list: nothing matches {args.pattern!r}", file=sys.stderr)
        return USAGE
    width = shutil.get_terminal_size((100, 20)).columns
    for kind, entries in found.items():
        if not entries:
            continue
        if args.names_only:
            print("\n".join(entries))
            continue
        print(f"{TITLES[kind]}:")
        name_w = min(36, max(len(n) for n in entries))
        for name, text in entries.items():
            line = f"  {name:<{name_w}}  {text}"
            print(line if len(line) <= width else line[: max(width - 3, name_w + 4)] + "...")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
