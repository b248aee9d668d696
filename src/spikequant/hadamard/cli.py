"""``spikequant hadamard N ...`` and ``spikequant hadamard-coverage``.

The main CLI calls :func:`register`; ``python -m spikequant.hadamard.cli N ...`` runs the same commands
stand-alone (a first argument that is not a command name means ``hadamard``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from spikequant.hadamard.constructions import NoHadamardError, alternatives, plan, verify
from spikequant.hadamard.coverage import coverage_table
from spikequant.hadamard.transform import hadamard_transform, kronecker_reference

COMMANDS = ("hadamard", "hadamard-coverage")


def cmd_hadamard(args: argparse.Namespace) -> int:
    """Print construction, online cost and the alternatives' costs of each size, check H·Hᵀ = n·I; 2 if a
    size has no construction."""
    status = 0
    for n in args.sizes:
        try:
            p = plan(n)
        except (NoHadamardError, ValueError) as e:
            print(f"spikequant: error: {e}", file=sys.stderr)
            status = 2
            continue
        checked = verify(n, dense_limit=args.dense_limit)
        # The fast transform against the Kronecker definition on random vectors, in float64.
        x = torch.randn(args.probes, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        err = float((hadamard_transform(x) - kronecker_reference(x)).abs().max())
        if err > 1e-10:
            print(f"spikequant: error: the fast transform of n={n} is off by {err:.1e}", file=sys.stderr)
            return 1
        alts = alternatives(n)
        others = "; ".join(f"{a.name} {a.cost:.0f}" for a in alts[:args.alternatives])
        more = f" (+{len(alts) - args.alternatives} more)" if len(alts) > args.alternatives else ""
        print(f"{p.describe()}; {checked}; fast transform matches it on {args.probes} random vectors "
              f"(max error {err:.0e}); alternatives (modelled cost/element): {others or 'none'}{more}",
              flush=True)
    return status


def cmd_coverage(args: argparse.Namespace) -> int:
    """Print the coverage tables (markdown) for the model dimensions in ``MODEL_DIMS``."""
    print(coverage_table())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``hadamard`` and ``hadamard-coverage`` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "hadamard", help="construction, online cost and an exact H·Hᵀ = n·I check for sizes N",
        description="For each N: the Hadamard construction used (the least modelled online cost), the "
                    "online cost of the fast transform, the alternatives' costs, and an exact check of "
                    "H·Hᵀ = N·I. Exit status 2 if some N has no construction (the message names sizes above it).")
    p.add_argument("sizes", type=int, nargs="+", metavar="N")
    p.add_argument("--dense-limit", type=int, default=2048,
                   help="multiply out the whole matrix up to this order; above it check each Kronecker "
                        "factor exactly (default: %(default)s)")
    p.add_argument("--probes", type=int, default=4, help="random vectors for the fast-transform check")
    p.add_argument("--alternatives", type=int, default=3,
                   help="other constructions of N to list with their modelled cost (default: %(default)s)")
    p.set_defaults(func=cmd_hadamard)
    p = subparsers.add_parser("hadamard-coverage",
                              help="Hadamard coverage of popular models' dimensions (markdown)")
    p.set_defaults(func=cmd_coverage)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone: ``python -m spikequant.hadamard.cli [hadamard] N ...`` or ``... hadamard-coverage``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "hadamard")
    parser = argparse.ArgumentParser(prog="python -m spikequant.hadamard.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
