"""Sample a server process with py-spy while it is under load, and say where its time went.

py-spy runs as its own process (`py-spy record --pid P --gil --format raw`): `--gil` keeps only the samples of
the thread holding the GIL, which is what a one-worker Python server spends its one usable core on. py-spy
pauses the process for each sample (100 a second), which slows the profiled phase down — its throughput is
reported but is not one of the benchmark's figures — and keeps the samples consistent. The raw
(collapsed-stack) output is summarised two ways:

- by stage — the outermost part of the ingest pipeline the sample is in (inline processing, storing,
  verifying, logging, the HTTP/ASGI machinery);
- by library — the innermost frame's package (SQLAlchemy, psycopg, json, hmac/stripe, structlog, h11, …).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# (label, pattern on one frame "func (file:line)"); the first stage found from the root down wins.
STAGES = [
    ("inline processing (webhooks.dispatch.process on the inline threads: claim, handler, ledger, mark)",
     r"\(webhooks/dispatch\.py"),
    ("storing the events (the writer thread, webhooks/writer.py: batch INSERT, commit)", r"\(webhooks/writer\.py"),
    ("verifying + parsing (router._verified_event)", r"(^|\.)_verified_event \(webhooks/router\.py"),
    ("verifying + parsing (stripe.Webhook.construct_event)", r"(^|\.)construct_event \(stripe/"),
    ("logging (structlog)", r"\(structlog/|\(service/logs\.py"),
    ("request middleware (service.api.request_context)", r"(^|\.)request_context \(service/api\.py"),
]
STAGE_OTHER = "HTTP/ASGI machinery, event loop, hand-offs (uvicorn, httptools/h11, starlette, asyncio, threads)"

# (label, pattern on the file of the innermost frame); the innermost frame matching any rule wins.
LIBRARIES = [
    ("SQLAlchemy", r"sqlalchemy/"),
    ("psycopg (driver, incl. waiting on the socket)", r"psycopg/|psycopg_binary/|psycopg_pool/"),
    ("json (encode/decode)", r"json/"),
    ("HMAC-SHA256 (hmac, hashlib)", r"hmac\.py|hashlib"),
    ("stripe SDK (WebhookSignature, StripeObject)", r"stripe/"),
    ("structlog / logging", r"structlog/|logging/"),
    ("uvicorn / httptools / h11 (HTTP parsing, protocol)", r"h11/|uvicorn/|httptools/"),
    ("starlette / fastapi", r"starlette/|fastapi/"),
    ("pydantic", r"pydantic"),
    ("asyncio / uvloop / anyio / threads", r"asyncio/|uvloop/|anyio/|threading\.py|concurrent/|selectors\.py|queue\.py"),
    ("service / webhooks code", r"^(service|webhooks|jobs)/"),
]

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def find_py_spy() -> str | None:
    """py-spy in the repository's .venv, else beside the running python (a worktree shares another
    checkout's venv), else on PATH."""
    for here in (Path(__file__).resolve().parents[2] / ".venv" / "bin" / "py-spy", Path(sys.executable).parent / "py-spy"):
        if here.exists():
            return str(here)
    return shutil.which("py-spy")


class Recorder:
    """`with Recorder(pid, out) as rec:` — py-spy samples `pid` until the block ends (SIGINT makes it write)."""

    def __init__(self, pid: int, output: Path, rate: int = 100, sampling: tuple[str, ...] = ("--gil",)) -> None:
        exe = find_py_spy()
        if exe is None:
            raise FileNotFoundError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.output = output
        self.command = [exe, "record", "--pid", str(pid), "--rate", str(rate), *sampling,
                        "--format", "raw", "--output", str(output)]
        self.log = output.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Recorder:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def sampler_stats(log: Path) -> dict[str, int]:
    """py-spy's own count of samples and errors, from its output."""
    found = re.search(r"Samples: (\d+) Errors: (\d+)", log.read_text(errors="replace")) if log.exists() else None
    return {"samples": int(found[1]), "errors": int(found[2])} if found else {}


def _frames(stack: str) -> list[tuple[str, str]]:
    """(func, file) from root to leaf."""
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part.strip())
        out.append((m["func"], m["file"]) if m else (part.strip(), ""))
    return out


def summarise(raw: Path, top: int = 12, stages_rules: list[tuple[str, str]] = STAGES,
              stage_other: str = STAGE_OTHER, library_rules: list[tuple[str, str]] = LIBRARIES) -> dict[str, Any]:
    """Percentages of samples by stage (the first of `stages_rules` found in the stack, else `stage_other`),
    by library (`library_rules` on the innermost matching frame), and the hottest leaf functions; the rules
    default to the ingest server's (another benchmark passes its own)."""
    stages: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    logging_inclusive = 0
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        texts = [f"{func} ({file}" for func, file in frames]
        stage = next((label for label, pattern in stages_rules if any(re.search(pattern, t) for t in texts)), stage_other)
        stages[stage] += count
        if any(re.search(r"\(structlog/|\(service/logs\.py", t) for t in texts):
            logging_inclusive += count
        library = "other (interpreter, stdlib)"
        for func, file in reversed(frames):
            hit = next((label for label, pattern in library_rules if re.search(pattern, file)), None)
            if hit:
                library = hit
                break
        libraries[library] += count
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += count
    pct = lambda c: round(100.0 * c / total, 1) if total else 0.0  # noqa: E731
    return {
        "samples": total,
        "by_stage": [(label, pct(c)) for label, c in stages.most_common()],
        "by_library": [(label, pct(c)) for label, c in libraries.most_common()],
        "logging_inclusive_pct": pct(logging_inclusive),
        "top_leaves": [(label, pct(c)) for label, c in leaves.most_common(top)],
    }
