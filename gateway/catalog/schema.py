"""Catalog schema and migrations: each migration runs once, in order, recorded in `schema_version`."""

from __future__ import annotations

import duckdb

MIGRATIONS: list[str] = [
    # 1: devices, batches, images, outbox. Times are unix seconds (DOUBLE), always UTC.
    """
    CREATE TABLE devices (
        device_id       VARCHAR PRIMARY KEY,
        name            VARCHAR NOT NULL,
        organization_id VARCHAR NOT NULL,
        status          VARCHAR NOT NULL,           -- pending | approved | rejected
        revoked         BOOLEAN NOT NULL DEFAULT false,
        origin          VARCHAR NOT NULL,           -- local | cloud | quarantine
        key_hash        VARCHAR NOT NULL UNIQUE,    -- sha256 of the key, for look-up
        key_sealed      BLOB,                       -- the key, AES-GCM sealed (keys.py)
        created_at      DOUBLE NOT NULL,
        last_seen_at    DOUBLE,
        last_status     VARCHAR,
        last_metrics    VARCHAR
    );
    CREATE TABLE batches (
        batch_id     VARCHAR PRIMARY KEY,
        device_id    VARCHAR NOT NULL,
        state        VARCHAR NOT NULL,              -- collecting | sealed | forwarded | drained
        opened_at    DOUBLE NOT NULL,
        sealed_at    DOUBLE,
        forwarded_at DOUBLE,
        drained_at   DOUBLE,
        image_count  INTEGER NOT NULL DEFAULT 0,
        total_bytes  BIGINT NOT NULL DEFAULT 0,
        manifest_key VARCHAR,
        manifest_at  DOUBLE
    );
    CREATE TABLE images (
        image_id          VARCHAR PRIMARY KEY,
        seq               BIGINT NOT NULL,
        batch_id          VARCHAR NOT NULL,
        device_id         VARCHAR NOT NULL,
        filename          VARCHAR NOT NULL,
        content_type      VARCHAR NOT NULL,
        size              BIGINT NOT NULL,
        xxh3_128          VARCHAR NOT NULL,
        storage_key       VARCHAR NOT NULL,
        metadata          BLOB,                     -- exactly as received
        received_at       DOUBLE NOT NULL,
        cloud_image_id    VARCHAR,
        cloud_batch_id    VARCHAR,
        cloud_storage_key VARCHAR,
        bytes_removed_at  DOUBLE
    );
    CREATE INDEX images_by_hash ON images (xxh3_128);
    CREATE TABLE outbox (
        image_id        VARCHAR PRIMARY KEY,
        seq             BIGINT NOT NULL,
        device_id       VARCHAR NOT NULL,
        size            BIGINT NOT NULL,
        state           VARCHAR NOT NULL,           -- pending | held | delivered | dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE,
        last_status     INTEGER,
        last_error      VARCHAR,
        created_at      DOUBLE NOT NULL,
        delivered_at    DOUBLE
    );
    """,
    # 2: how many cloud image ids the stored manifest holds, so a manifest written before the
    # cloud's ids arrived is known to be stale and rewritten (gateway.batches.manifests).
    """
    ALTER TABLE batches ADD COLUMN manifest_cloud_ids INTEGER;
    """,
    # 3: what an agent's heartbeat reports (POST /api/core/agent/checkin), what a device said of
    # itself when it was provisioned, and provisioning tokens (only their SHA-256 is kept).
    """
    ALTER TABLE devices ADD COLUMN last_model_id VARCHAR;
    ALTER TABLE devices ADD COLUMN last_ip VARCHAR;
    ALTER TABLE devices ADD COLUMN pending_requests VARCHAR;  -- JSON list, as the last heartbeat gave it
    ALTER TABLE devices ADD COLUMN device_info VARCHAR;       -- JSON object, as provisioning gave it
    CREATE TABLE provisioning_tokens (
        token_id     VARCHAR PRIMARY KEY,
        name         VARCHAR NOT NULL,
        token_hash   VARCHAR NOT NULL UNIQUE,
        single_use   BOOLEAN NOT NULL,
        use_count    INTEGER NOT NULL DEFAULT 0,
        created_at   DOUBLE NOT NULL,
        expires_at   DOUBLE,                        -- NULL: never expires
        last_used_at DOUBLE,
        revoked_at   DOUBLE
    );
    """,
    # 4: facts about this gateway checked at start, e.g. the fingerprint of the key secret that
    # sealed the device keys (gateway.devices.keysecret): a start with another secret is refused.
    """
    CREATE TABLE gateway_facts (
        name  VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    );
    """,
    # 5: near-duplicate frames (gateway.ingest.neardup): the frame's 64-bit difference hash (NULL when
    # it could not be decoded), the earlier frame it nearly repeats, and devices exempt from the filter.
    """
    ALTER TABLE images ADD COLUMN fingerprint UBIGINT;
    ALTER TABLE images ADD COLUMN near_duplicate_of VARCHAR;
    ALTER TABLE devices ADD COLUMN near_dup_exempt BOOLEAN DEFAULT false;
    """,
    # 6: the priority class of each outbox entry, decided at ingest (gateway.forward.classes); entries
    # from before classes existed are in the implicit `default` class.
    """
    ALTER TABLE outbox ADD COLUMN priority_class VARCHAR DEFAULT 'default';
    UPDATE outbox SET priority_class = 'default' WHERE priority_class IS NULL;
    """,
]


def migrate(conn: duckdb.DuckDBPyConnection) -> int:
    """Bring the schema up to date; returns the version now in force."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    for version, ddl in enumerate(MIGRATIONS[current:], start=current + 1):
        conn.execute("BEGIN")
        try:
            conn.execute(ddl)
            conn.execute("INSERT INTO schema_version VALUES (?)", [version])
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
