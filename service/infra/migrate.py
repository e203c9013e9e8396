"""Schema migrations: `credits migrate` and the test suite both upgrade to head through here."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that needs no alembic.ini (the scripts ship in the package)."""
    config = Config()
    config.set_main_option("script_location", "service:migrations")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> None:
    """Upgrade the database behind `engine` to the newest revision."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
