"""Launch the real service for the benchmark: `python -m bench.ingest.server --port P [--log-level L]`.

Configuration comes from the environment exactly as for `credits serve` (DATABASE_URL,
STRIPE_WEBHOOK_SECRET, CREDITS_API_TOKEN, CREDITS_ADMIN_TOKEN, CREDITS_CONFIG, LOG_FORMAT); the only
difference is the structlog level, which the benchmark may raise to WARNING so that the three INFO lines per
webhook (request, webhook.received, event.handled) are measured separately from the ingest path itself.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from bench.ingest import UVICORN
from service import logs, runtime
from service.api import create_app
from service.config import Settings



def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest.server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="structlog level (the service's own default is info)")
    parser.add_argument("--defer-processing", action="store_true",
                        help="diagnostic: the inline processor's dispatch.process does nothing, so events stay pending "
                             "for the worker; measures the ingest path (verify, store, answer) without the processing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    settings = Settings()
    problem = settings.token_problem()
    if problem:
        raise SystemExit(problem)
    logs.configure(settings.log_format, level=getattr(logging, args.log_level.upper()))
    if args.defer_processing:
        from webhooks import dispatch

        dispatch.process = lambda *_args, **_kwargs: None  # webhooks/inline.py looks it up at call time
    app = create_app(runtime.load(settings))
    uvicorn.run(app, host="127.0.0.1", port=args.port, **UVICORN)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
