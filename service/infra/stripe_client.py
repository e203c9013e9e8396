"""The one outbound Stripe client: every call the service makes to Stripe goes here.

It wraps `stripe.StripeClient` on `stripe.HTTPXClient`, so tests intercept it with respx, and puts every call
behind a single tenacity policy: 429, 5xx and connection errors are retried with jittered exponential backoff
a bounded number of times, then the original stripe exception is raised. Stripe's own `max_network_retries`
is 0 so the two retry loops never multiply. Results are plain JSON-shaped dicts, the same shape a webhook
payload has, so handlers, reconciliation and backfill never depend on `StripeObject`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TypeVar, cast
from urllib.parse import quote

import httpx
import stripe
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import WaitBaseT

from service.infra import metrics
from service.infra.config import Settings

# The API version this SDK release was generated for; pinning it means a dashboard default change cannot
# reshape the objects we read. It moves only when the pinned `stripe` dependency is upgraded.
STRIPE_API_VERSION: Final[str] = stripe.api_version
MAX_ATTEMPTS: Final = 5
# The largest page Stripe serves; fewer round trips for a reconciliation window.
PAGE_SIZE: Final = 100
# Per request, so MAX_ATTEMPTS bounds the worst case of a call; Stripe's SDK default (80 s) would stall a worker.
TIMEOUT_SECONDS: Final = 20.0

T = TypeVar("T")
RetryHook = Callable[[BaseException], None]


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: rate limited, Stripe-side failure, or the request never got an answer.

    Every other 4xx (bad request, auth, not found, card) would fail identically again, so it is raised at once.
    """
    if isinstance(exc, (stripe.RateLimitError, stripe.APIConnectionError)):
        return True
    return isinstance(exc, stripe.APIError) and (exc.http_status or 0) >= 500


# The service's one retry policy; each gateway uses a copy carrying its own retry hook (and, in tests, a zero wait).
RETRY_POLICY: Final = Retrying(
    retry=retry_if_exception(is_transient),
    wait=wait_random_exponential(multiplier=0.5, max=8),
    stop=stop_after_attempt(MAX_ATTEMPTS),
    reraise=True,
)


class StripeGateway:
    """Read access to Stripe for the webhook handlers and reconciliation, retried by `RETRY_POLICY`."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_retry: RetryHook | None = None,
        retry_wait: WaitBaseT | None = None,
    ) -> None:
        """`on_retry` sees each exception about to be retried (a metric hooks in here); `retry_wait` replaces
        the backoff, so tests can retry without sleeping."""
        self._client = stripe.StripeClient(
            settings.stripe_api_key.get_secret_value(),
            base_addresses={"api": settings.stripe_api_base},
            http_client=stripe.HTTPXClient(timeout=TIMEOUT_SECONDS, allow_sync_methods=True),
            max_network_retries=0,
            stripe_version=STRIPE_API_VERSION,
        )
        self._on_retry = on_retry
        overrides: dict[str, Any] = {"before_sleep": self._before_retry}
        if retry_wait is not None:
            overrides["wait"] = retry_wait
        self._retrying = RETRY_POLICY.copy(**overrides)

    def retrieve_customer(self, customer_id: str) -> dict[str, Any]:
        """The customer (or its `deleted: true` stub), for `metadata.account_id` / `metadata.referral_code`."""
        return self._call(self._get_json, f"/v1/customers/{quote(customer_id, safe='')}", {})  # one per new customer

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        """The subscription as Stripe holds it now, for its metadata and plan."""
        return self._call(self._client.v1.subscriptions.retrieve, subscription_id).to_dict(for_json=True)

    def retrieve_invoice(self, invoice_id: str) -> dict[str, Any]:
        """The invoice, for the refill and referral qualification of a charge or refund that names it."""
        return self._call(self._client.v1.invoices.retrieve, invoice_id).to_dict(for_json=True)

    def invoice_for_payment_intent(self, payment_intent: str) -> str | None:
        """The invoice a payment intent paid, through the invoice's payments (charges lost `invoice` in 2025)."""
        params = {"payment": {"type": "payment_intent", "payment_intent": payment_intent}, "limit": 1}
        page = self._call(self._client.v1.invoice_payments.list, params)
        return next((ref_id(item.invoice) for item in page.data), None)

    def list_checkout_session_line_items(self, session_id: str) -> list[dict[str, Any]]:
        """All line items of a Checkout session: webhooks omit them, and a pack without `metadata.pack` is
        recognised by its price."""
        return list(self._pages(f"/v1/checkout/sessions/{quote(session_id, safe='')}/line_items", {}))

    def iterate_customer_paid_invoices(self, customer_id: str) -> Iterator[dict[str, Any]]:
        """One customer's paid invoices, newest first, whenever paid: a support backfill looks there for the
        referee's first qualifying invoice when no webhook ever recorded it."""
        return self._pages("/v1/invoices", {"customer": customer_id, "status": "paid"})

    def iterate_events(
        self,
        *,
        created_gte: int | None = None,
        created_lte: int | None = None,
        types: list[str] | None = None,
        delivery_success: bool | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Events in the window, newest first, one page in memory at a time.

        `delivery_success=False` is how reconciliation finds what never reached the webhook endpoint.
        """
        params: dict[str, Any] = {}
        if created := _range(created_gte, created_lte):
            params["created"] = created
        if types:
            params["types"] = types
        if delivery_success is not None:
            params["delivery_success"] = delivery_success
        return self._pages("/v1/events", params)

    def iterate_invoices(
        self,
        status: str = "paid",
        *,
        created_gte: int | None = None,
        created_lte: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Invoices with `status` in the window, newest first, one page in memory at a time."""
        params: dict[str, Any] = {"status": status}
        if created := _range(created_gte, created_lte):
            params["created"] = created
        return self._pages("/v1/invoices", params)

    def iterate_customers(self, *, created_gte: int, created_lte: int) -> Iterator[dict[str, Any]]:
        """Customers created in the window, newest first (deleted ones are not listed), for the
        `metadata.referral_code` of new customers: one page per 100 instead of one request each."""
        return self._pages("/v1/customers", {"created": _range(created_gte, created_lte)})

    def iterate_completed_checkout_sessions(self, *, created_gte: int, created_lte: int) -> Iterator[dict[str, Any]]:
        """Completed Checkout sessions created in the window, newest first, for a `metadata.referral_code`
        set on the session that created a subscription (only a completed session creates one)."""
        return self._pages("/v1/checkout/sessions", {"created": _range(created_gte, created_lte), "status": "complete"})

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Lazily walk a list endpoint with `starting_after`, each page its own retried request.

        Paging by hand rather than with `auto_paging_iter` keeps every page request inside the retry policy.
        """
        params = {**params, "limit": PAGE_SIZE}
        while True:
            page = self._call(self._get_json, path, params)
            items: list[dict[str, Any]] = page["data"]
            yield from items
            if not page.get("has_more") or not items:
                return
            params = {**params, "starting_after": items[-1]["id"]}

    def _get_json(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """GET `path` through the StripeClient's own requestor (keys, API version, headers, typed errors) and
        parse the body with plain `json.loads`.

        The typed services turn a page into a `StripeObject` tree that `to_dict` then turns back into dicts, and
        `raw_request` parses into OrderedDicts: for a page of 100 events that is ~30x and ~3x the cost of the
        parse itself, and most of the CPU of a long reconciliation (bench/reconcile.py). The body is requested as a
        stream because for a buffered one the SDK formats the whole body into a debug log line (`logfmt`, a
        `repr` of ~600 KB) even when nothing logs it — a fifth of the paging CPU. The requestor's methods are
        private; the SDK is pinned to one release, and tests/test_stripe_client.py checks paging, retries and
        errors through them.
        """
        requestor = self._client._requestor
        chunks, status, headers = requestor.request_raw(
            "get", path, params, {}, is_streaming=True, base_address="api", api_mode="V1", usage=["stripe_credits_list"]
        )
        try:
            body = b"".join(cast(Iterable[bytes], chunks))  # the body streamed: an iterable of bytes
        except httpx.HTTPError as exc:  # read after the SDK returned, so it cannot wrap it: a connection error
            raise stripe.APIConnectionError(f"reading the response to GET {path} failed: {exc}") from exc  # type: ignore[no-untyped-call]  # stripe leaves its errors' __init__ untyped
        if requestor._should_handle_code_as_error(status):
            requestor._interpret_response(body, status, headers, "V1")  # raises the StripeError for the status
        page: dict[str, Any] = json.loads(body)
        return page

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = self._retrying(fn, *args)
        except Exception:
            metrics.STRIPE_CALLS.labels("error").inc()
            raise
        metrics.STRIPE_CALLS.labels("ok").inc()
        return result

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if self._on_retry is not None and exc is not None:
            self._on_retry(exc)


def ref_id(value: Any) -> str | None:
    """An expandable field's id, whether Stripe sent the id or the expanded object."""
    return value if isinstance(value, str) else getattr(value, "id", None)


def _range(gte: int | None, lte: int | None) -> dict[str, int]:
    """Stripe's `created[gte]` / `created[lte]` filter, with only the bounds given."""
    bounds = {"gte": gte, "lte": lte}
    return {key: value for key, value in bounds.items() if value is not None}
