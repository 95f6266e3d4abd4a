-- The spool: messages accepted in this region for a region that could not
-- be reached, kept in their sender's home shard until a drainer forwards
-- them, in `position` order.
CREATE TABLE spool (
    position           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_region TEXT NOT NULL,
    message_id         TEXT NOT NULL UNIQUE,
    sender_id          TEXT NOT NULL,
    recipient_id       TEXT NOT NULL,
    kind               TEXT NOT NULL,
    payload            BLOB NOT NULL,
    headers            TEXT NOT NULL,     -- JSON object of strings
    idempotency_key    TEXT,
    origin_region      TEXT NOT NULL,
    accepted_at        INTEGER NOT NULL,  -- microseconds since the Unix epoch
    traceparent        TEXT,
    spooled_at         INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT
);

CREATE INDEX spool_by_destination ON spool (destination_region, position);
CREATE INDEX spool_by_sender ON spool (sender_id, recipient_id);
