"""Alembic migrations, shipped inside the package so `credits migrate` works from an installed wheel."""
