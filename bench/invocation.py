"""What every benchmark's invocation shares: its options as typed, the header of its results, its main."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

Parse = Callable[[list[str] | None], argparse.Namespace]


def argv_shown(args: argparse.Namespace, parse: Parse) -> list[str]:
    """The non-default options of this run, as they would be typed (a flag as `--x` / `--no-x`)."""
    defaults, out = vars(parse([])), []
    for key, value in vars(args).items():
        if key in ("json", "admin_url") or value == defaults.get(key):
            continue
        option = key.replace("_", "-")
        out += ([f"--{option}" if value else f"--no-{option}"] if isinstance(value, bool)
                else [f"--{option}", str(value)])
    return out


def header(args: argparse.Namespace, parse: Parse, module: str, workdir: Path) -> dict[str, Any]:
    """The start of a run's results: when, where its files are, its options, and the command that repeats it."""
    return {"started": datetime.now(UTC).isoformat(timespec="seconds"), "workdir": str(workdir),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join([f".venv/bin/python -m {module}", *argv_shown(args, parse)])}


def progress(module: str, clock: float) -> Callable[[str], None]:
    """A progress printer for stderr, each line stamped with the module and the seconds since `clock`."""

    def say(text: str) -> None:
        print(f"[{module} {time.monotonic() - clock:5.0f} s] {text}", file=sys.stderr, flush=True)

    return say


def finished(results: dict[str, Any], clock: float, report: ModuleType) -> dict[str, Any]:
    """The run's results completed with its duration and the report's derived figures (ratios, targets)."""
    results["duration_seconds"] = round(time.monotonic() - clock, 1)
    results["derived"] = report.derive(results)
    return results


def raise_on_sigterm(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the run's `finally` stops its processes and drops its database."""
    raise SystemExit(143)


def main(argv: list[str] | None, parse: Parse, run: Callable[[argparse.Namespace], dict[str, Any]],
         report: ModuleType) -> dict[str, Any]:
    """Parse, run, print the report's table, and write the results as JSON when `--json` asks."""
    args = parse(argv)
    results = run(args)
    print(report.table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results
