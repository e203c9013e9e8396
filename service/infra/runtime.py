"""What every entry point loads first: settings, the validated catalogue, the database and the Stripe client.

Loading everything up front is what makes a bad catalogue or URL fail at start-up, not at a webhook.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.infra import catalogue, metrics
from service.infra.catalogue import Catalogue
from service.infra.config import Settings
from service.infra.db import make_engine, make_sessionmaker
from service.infra.stripe_client import StripeGateway
from service.infra.uow import UnitOfWork


@dataclass(frozen=True)
class Runtime:
    """The loaded configuration and the handles the API, the CLI, the worker and the jobs share."""

    settings: Settings
    catalogue: Catalogue
    engine: Engine
    sessions: sessionmaker[Session]
    stripe: StripeGateway

    def uow(self) -> UnitOfWork:
        """A new unit of work (one transaction) for an entry point to open."""
        return UnitOfWork(self.sessions)


def load(settings: Settings | None = None) -> Runtime:
    """Read the environment and the catalogue (raising CatalogueError on a bad one) and open the engine."""
    settings = settings or Settings()
    engine = make_engine(settings.database_url)
    return Runtime(
        settings,
        catalogue.load(settings.credits_config),
        engine,
        make_sessionmaker(engine),
        StripeGateway(settings, on_retry=metrics.stripe_retry),
    )
