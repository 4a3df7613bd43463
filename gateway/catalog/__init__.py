"""DuckDB catalog: schema, the single-writer owner, and the queries that belong to it."""

from gateway.catalog.db import Catalog, CatalogLocked, Conn, Expected

__all__ = ["Catalog", "CatalogLocked", "Conn", "Expected"]
