-- The directory: agencies and where they live, plus the event outbox.
CREATE TABLE agencies (
    agency_id     TEXT PRIMARY KEY,
    region        TEXT NOT NULL,
    shard         TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    registered_at BIGINT NOT NULL -- microseconds since the Unix epoch
);

CREATE INDEX agencies_by_region ON agencies (region, agency_id);

CREATE TABLE outbox (
    row_id      BIGSERIAL PRIMARY KEY,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    region      TEXT NOT NULL,
    agency_id   TEXT NOT NULL,
    message_id  TEXT,
    occurred_at BIGINT NOT NULL,
    attributes  TEXT NOT NULL
);
