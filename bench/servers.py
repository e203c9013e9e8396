"""The ingest benchmark's references, each served like the service (uvicorn, one process, no access log):

- `minimal`: the least a correct Stripe webhook endpoint does — a FastAPI app with one route that calls
  `stripe.Webhook.construct_event(body, header, secret, tolerance=300)` and answers 200 (400 when it fails);
- `floor`: a bare ASGI app that reads the body and answers 200 — what HTTP alone costs on this machine.

`python -m bench.servers minimal|floor --port P` (secret from STRIPE_WEBHOOK_SECRET); `GET /ready` answers 200.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import stripe
import uvicorn
from fastapi import FastAPI, Request, Response


def minimal(secret: str) -> FastAPI:
    app = FastAPI()

    @app.post("/webhooks/stripe")
    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            stripe.Webhook.construct_event(body, request.headers.get("stripe-signature", ""), secret, tolerance=300)
        except (ValueError, stripe.SignatureVerificationError):
            return Response(status_code=400)
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {}

    return app


async def floor(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("kind", choices=["minimal", "floor"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = minimal(os.environ["STRIPE_WEBHOOK_SECRET"]) if args.kind == "minimal" else floor
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_config=None, log_level="warning")


if __name__ == "__main__":
    main()
