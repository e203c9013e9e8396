"""What every benchmark's invocation shares: its options as typed, the header of its results, its main."""

from __future__ import annotations

import argparse
import json
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
