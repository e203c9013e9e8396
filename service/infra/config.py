"""Environment configuration, read once per entry point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob the service reads from its environment (the README lists them)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    database_url: str = "sqlite:///./credits.db"
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_api_key: SecretStr = SecretStr("")
    stripe_api_base: str = "https://api.stripe.com"
    stripe_livemode: bool = False
    credits_config: Path = Path("credits.toml")
    credits_api_token: SecretStr | None = None
    credits_admin_token: SecretStr | None = None
    referral_link_base: str = "https://example.com/r/"
    log_format: str = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    metrics_token: SecretStr | None = None
    # /metrics tells inbox depth and credit totals: it needs METRICS_TOKEN (or the admin token) unless opened.
    metrics_public: bool = False
    inbox_alert_seconds: float = 300.0
    # With the default backoff (30 s doubling, at most 6 h) an event that keeps failing is retried for about
    # 74 hours before it is dead: Stripe itself retries for three days, and an event that arrives before
    # the one it depends on (a refund before its payment) must outlive that wait.
    worker_max_attempts: int = 22
    worker_backoff_seconds: float = 30.0
    # Whether `credits serve` also runs the worker's drain loop, so that one process is a whole system. Off
    # where `credits worker` runs on its own (compose, Kubernetes): `credits serve --no-worker` says the same.
    serve_worker: bool = True
    # Threads of one worker draining side by side on PostgreSQL (processing mostly waits on the database);
    # SQLite has one writer at a time, so one. Each holds one of the pool's connections (db.POOL_SIZE).
    worker_threads: int = Field(default=4, ge=1, le=16)
    # How long a worker waits, once nothing is due, before it looks again: an event the API left pending waits
    # at most this long; each look is one indexed query.
    worker_poll_seconds: float = Field(default=0.25, gt=0, le=60)
    # How long `credits worker` rides out a database it cannot reach (a restart, a failover), retrying with
    # backoff, before it exits 1 for its service manager to restart it and the outage to be seen.
    worker_outage_seconds: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, url: str) -> str:
        """`postgresql://` (what people paste) means psycopg 3 here, not SQLAlchemy's psycopg2 default."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def log_threshold(self) -> int:
        """LOG_LEVEL as the logging module's number, for logs.configure."""
        return int(getattr(logging, self.log_level.upper()))

    @property
    def webhook_secrets(self) -> list[str]:
        """All accepted signing secrets: during a rotation Stripe signs with old and new."""
        raw = self.stripe_webhook_secret.get_secret_value()
        return [s.strip() for s in raw.split(",") if s.strip()]

    def token_problem(self) -> str | None:
        """Why the API cannot start with these tokens, or None when they are usable."""
        api, admin = self.credits_api_token, self.credits_admin_token
        if api is None or not api.get_secret_value():
            return "CREDITS_API_TOKEN is not set"
        if admin is None or not admin.get_secret_value():
            return "CREDITS_ADMIN_TOKEN is not set"
        if api.get_secret_value() == admin.get_secret_value():
            return "CREDITS_ADMIN_TOKEN must differ from CREDITS_API_TOKEN"
        return None
