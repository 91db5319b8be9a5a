"""Command line: ``python -m harness <command>`` (the suites and the CLI call the same functions)."""

from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from harness.formats import FORMATS


def _formats(args: argparse.Namespace) -> int:
    rows = [
        [
            f.name,
            f.element.name,
            "x".join(map(str, f.block_shape)),
            f.scale.name,
            f.bits_per_element,
            f.marker,
            f.description,
        ]
        for f in FORMATS.values()
    ]
    print(tabulate(rows, headers=["format", "element", "block", "scale", "bits/elem", "marker", "description"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("formats", help="list the registered quantization formats").set_defaults(run=_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
