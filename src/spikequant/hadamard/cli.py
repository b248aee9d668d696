"""``spikequant hadamard N ...`` and ``spikequant hadamard-coverage``."""

from __future__ import annotations

import argparse
import sys

from spikequant.hadamard.constructions import NoHadamardError, plan, verify
from spikequant.hadamard.coverage import coverage_table


def cmd_hadamard(args: argparse.Namespace) -> int:
    for n in args.sizes:
        try:
            p = plan(n)
        except NoHadamardError as e:
            print(f"spikequant: error: {e}", file=sys.stderr)
            return 2
        checked = verify(n, dense_limit=args.dense_limit)
        print(f"{p.describe()}; H·Hᵀ = n·I checked ({checked})")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    print(coverage_table())
    return 0


def register(sub) -> None:
    p = sub.add_parser("hadamard", help="construction, online cost and H·Hᵀ = n·I check for sizes N")
    p.add_argument("sizes", type=int, nargs="+", metavar="N")
    p.add_argument("--dense-limit", type=int, default=4096,
                   help="multiply out the whole matrix up to this size; above it check the Kronecker factors")
    p.set_defaults(func=cmd_hadamard)
    p = sub.add_parser("hadamard-coverage", help="Hadamard coverage of popular models' dimensions (markdown)")
    p.set_defaults(func=cmd_coverage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spikequant-hadamard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
