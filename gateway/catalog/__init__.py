"""DuckDB catalog: schema and migrations, the one writer thread (`writer`) that journals typed
records (`records`, `journal`) and applies them with this schema's SQL (`apply`), and where each
upload goes (`collecting`: its seq and its device's open batch)."""

from gateway.catalog.db import Catalog, CatalogLocked, Conn, Expected

__all__ = ["Catalog", "CatalogLocked", "Conn", "Expected"]
