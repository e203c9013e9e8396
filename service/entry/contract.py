"""The API's contract: FastAPI's OpenAPI document, completed with what the routes share and FastAPI cannot see
from their signatures — every error a route can answer (the bearer token, the Idempotency-Key, an unknown
account, an outage), each in the one error shape; that the Idempotency-Key is required on every POST; and
that a spend is an amount or an action, not both.

A client generated from the document, or schemathesis checking the service against it
(tests/reliability/test_schema_fuzz.py), then meets no answer the document does not list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.entry.idempotency import MAX_KEY_LENGTH

ERROR = "ErrorAnswer"
ERROR_SCHEMA = {
    "title": ERROR,
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code (README.md, the error table)"},
        "message": {"type": "string", "description": "what went wrong, for a person"},
    },
    "additionalProperties": True,
}
# What every /v1 route may answer, and what every POST, every admin route and every route of an account adds.
EVERY = {
    401: "unauthorized: no bearer token, or a wrong one",
    422: "invalid_request: the request does not validate (`details` says where)",
    500: "internal_error: a bug, logged with the request id",
    503: "database_unavailable: retry",
}
POSTS = {
    400: "idempotency_key_required: no Idempotency-Key, or one over 255 characters",
    409: "idempotency_key_reused: the key was used with another request",
    413: "body_too_large: a body over 1 MiB",
}
ADMIN = {403: "forbidden: the API token on an admin route"}
OF_AN_ACCOUNT = {404: "account_not_found, or a member or team the account does not have"}


def install(app: FastAPI, routers: list[APIRouter], admin_only: Callable[..., Any]) -> None:
    """Serve the completed document as the app's OpenAPI: `routers` are the app's /v1 routers, `admin_only` the
    dependency admin routes carry."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _complete(document, [r for router in routers for r in router.routes], admin_only)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the document


def _complete(document: dict[str, Any], routes: list[Any], admin_only: Callable[..., Any]) -> None:
    document.setdefault("components", {}).setdefault("schemas", {})[ERROR] = ERROR_SCHEMA
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        for method in route.methods or ():
            operation = document["paths"][route.path_format][method.lower()]
            answers = {**EVERY}
            if method == "POST":
                answers |= POSTS
                _require_the_key(operation)
            if _needs(route.dependant, admin_only):
                answers |= ADMIN
            if "{account}" in route.path_format and not route.path_format.endswith("/grants"):
                answers |= OF_AN_ACCOUNT
            _answer(operation, answers)
    spend = document["components"]["schemas"].get("SpendRequest")
    if spend is not None:
        spend["oneOf"] = [
            {"required": ["amount"], "properties": {"amount": {"type": "integer"}}},
            {"required": ["action"], "properties": {"action": {"type": "string"}}},
        ]


def _answer(operation: dict[str, Any], answers: dict[int, str]) -> None:
    """Add the answers the operation does not list yet, and give every error its one shape."""
    responses = operation.setdefault("responses", {})
    for status, description in answers.items():
        responses.setdefault(str(status), {"description": description})
    for status, response in responses.items():
        if int(status) >= 400:
            response["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR}"}}}


def _require_the_key(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "header" and parameter["name"] == "Idempotency-Key":
            parameter["required"] = True
            parameter["schema"] = {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH}


def _needs(dependant: Dependant, dependency: Callable[..., Any]) -> bool:
    """Whether the route depends on `dependency`, however deep."""
    return any(d.call is dependency or _needs(d, dependency) for d in dependant.dependencies)
