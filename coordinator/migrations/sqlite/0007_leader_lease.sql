-- The leader lease of the coordinator replicas: one row per lease. The
-- token grows by one with every new holder; singleton writes carry it and
-- are refused when it is no longer the lease's.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY NOT NULL,
    holder      TEXT NOT NULL,
    token       BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL, -- microseconds since the Unix epoch
    expires_at  BIGINT NOT NULL
);

-- Gateways the leader marked down (missed their reports) or up again.
CREATE TABLE gateway_states (
    gateway_id TEXT PRIMARY KEY NOT NULL,
    region     TEXT NOT NULL,
    up         BOOLEAN NOT NULL,
    changed_at BIGINT NOT NULL,
    token      BIGINT NOT NULL  -- the lease token of the write
);
