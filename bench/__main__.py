"""``python -m bench NAME [--json] [--quick]``: run one benchmark and print its figures."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys

import bench
from bench.harness import report

NOT_BENCHES = {"__main__", "anchors", "harness", "pki_replicas"}  # pki_replicas: pki's


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in NOT_BENCHES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=available(), help="which benchmark to run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast run (benches that offer one)"
    )
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        help="the CA store to measure (benches that offer one: pki; default sqlite)",
    )
    args = parser.parse_args(argv)
    module = importlib.import_module(f"bench.{args.name}")
    # A bench that needs its process set up a certain way (PROCESS_ENV: BOTD pins glibc's
    # allocator, which otherwise skews the TLS anchor by what ran before it) runs again
    # in a process that has it; what it pins is reported with the figures.
    wanted = getattr(module, "PROCESS_ENV", {})
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        env = {**os.environ, **wanted}
        raw = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "bench", *raw], env)
    options: dict[str, object] = {}
    if args.quick:
        if "quick" not in inspect.signature(module.run).parameters:
            parser.error(f"bench {args.name} has no --quick")
        options["quick"] = True
    if args.store is not None:
        if "store" not in inspect.signature(module.run).parameters:
            parser.error(f"bench {args.name} has no --store")
        options["store"] = args.store
    results = module.run(**options)
    info = module.info() if hasattr(module, "info") else None  # facts about the run
    print(report(args.name, results, as_json=args.json, info=info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
