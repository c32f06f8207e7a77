-- Fieldgate cloud schema v1. One file for both backends: `BLOB` becomes `BYTEA` on PostgreSQL
-- (see db.rs); every other type is spelled the same way in SQLite and PostgreSQL.
-- Ids are opaque random text (`tn_…`, `gw_…`): unguessable, so no object can be enumerated.
-- Times are UTC milliseconds since the Unix epoch.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    ca_cert_pem TEXT NOT NULL,
    ca_key_pem TEXT NOT NULL,
    -- Ingest rate limit in readings per second; NULL takes the service default.
    ingest_readings_per_s BIGINT
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, email)
);

CREATE TABLE login_sessions (
    token_hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE sites (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    -- Optional scope: only gateways of this site / carrying this label.
    site_id TEXT REFERENCES sites(id),
    label_key TEXT,
    label_value TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);

CREATE TABLE gateways (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    site_id TEXT NOT NULL REFERENCES sites(id),
    name TEXT NOT NULL,
    version TEXT,
    backlog BIGINT,
    last_seen_at BIGINT,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    decommissioned_at BIGINT
);
CREATE INDEX gateways_by_tenant ON gateways (tenant_id, id);
-- A name is unique among a tenant's active gateways: a replacement may take a decommissioned
-- gateway's name.
CREATE UNIQUE INDEX gateways_active_name ON gateways (tenant_id, name) WHERE status = 'active';

CREATE TABLE gateway_labels (
    gateway_id TEXT NOT NULL REFERENCES gateways(id),
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (gateway_id, key)
);
CREATE INDEX gateway_labels_by_value ON gateway_labels (tenant_id, key, value);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    site_id TEXT NOT NULL REFERENCES sites(id),
    token_hash TEXT NOT NULL UNIQUE,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    gateway_id TEXT
);

CREATE TABLE gateway_certs (
    fingerprint TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    gateway_id TEXT NOT NULL REFERENCES gateways(id),
    serial TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    first_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX gateway_certs_by_gateway ON gateway_certs (gateway_id);

CREATE TABLE streams (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    gateway_id TEXT NOT NULL REFERENCES gateways(id),
    name TEXT NOT NULL,
    -- The next sequence number the stream accepts; NULL until its first batch.
    next_seq BIGINT,
    readings BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (gateway_id, name)
);

-- Readings the gateway declared lost before they reached the cloud (its journal overflowed).
CREATE TABLE stream_gaps (
    stream_id TEXT NOT NULL REFERENCES streams(id),
    tenant_id TEXT NOT NULL,
    from_seq BIGINT NOT NULL,
    to_seq BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (stream_id, from_seq)
);

-- Accepted batches as received, waiting for the compactor to split them into series chunks.
-- `skip` readings at the start were already stored (an overlapping resend); the rest are new.
CREATE TABLE staged_batches (
    stream_id TEXT NOT NULL REFERENCES streams(id),
    first_seq BIGINT NOT NULL,
    skip BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (stream_id, first_seq)
);

CREATE TABLE series (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    gateway_id TEXT NOT NULL REFERENCES gateways(id),
    stream TEXT NOT NULL,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (gateway_id, stream, device, metric)
);
CREATE INDEX series_by_tenant ON series (tenant_id, device, metric);

-- Readings, stored per series in chunks (the shared codec's series chunks) with pre-computed
-- aggregates, so range queries and rollups read few rows. A chunk is keyed by the stream
-- sequence number where its compaction run started (and its value kind): staged batches are
-- compacted once, so a key is never reused.
CREATE TABLE chunks (
    series_id TEXT NOT NULL REFERENCES series(id),
    first_seq BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    first_ts BIGINT NOT NULL,
    last_ts BIGINT NOT NULL,
    count BIGINT NOT NULL,
    min_value DOUBLE PRECISION,
    max_value DOUBLE PRECISION,
    sum_value DOUBLE PRECISION,
    data BLOB NOT NULL,
    PRIMARY KEY (series_id, first_seq, kind)
);
CREATE INDEX chunks_by_time ON chunks (series_id, first_ts);

CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_log (tenant_id, at);
