"""The reference: the least a correct Stripe webhook endpoint can do. It verifies the signature with
`stripe.Webhook.construct_event(body, header, secret, tolerance=300)`, stores nothing and answers 200.

`python -m bench.ingest.reference --port P` (secret from STRIPE_WEBHOOK_SECRET); served with the same
uvicorn settings as the service (bench/ingest/__init__.py: UVICORN).
"""

from __future__ import annotations

import argparse
import os

import stripe
import uvicorn
from fastapi import FastAPI, Request, Response

from bench.ingest import UVICORN


def create_app(secret: str) -> FastAPI:
    app = FastAPI(title="reference webhook")

    @app.post("/webhooks/stripe")
    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            stripe.Webhook.construct_event(body, request.headers.get("stripe-signature", ""), secret, tolerance=300)
        except (ValueError, stripe.SignatureVerificationError):
            return Response(status_code=400)
        return Response(status_code=200)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest.reference", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(os.environ["STRIPE_WEBHOOK_SECRET"]), host="127.0.0.1", port=args.port, **UVICORN)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
