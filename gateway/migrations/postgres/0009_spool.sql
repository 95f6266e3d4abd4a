-- The spool: messages accepted in this region for a region that could not
-- be reached, kept in their sender's home shard until a drainer forwards
-- them. `position` orders them; a sender sends its next message only after
-- the receipt of the previous one, so its messages are in position order
-- whatever the commit order of other senders' rows.
CREATE TABLE spool (
    position           BIGSERIAL PRIMARY KEY,
    destination_region TEXT NOT NULL,
    message_id         TEXT NOT NULL UNIQUE,
    sender_id          TEXT NOT NULL,
    recipient_id       TEXT NOT NULL,
    kind               TEXT NOT NULL,
    payload            BYTEA NOT NULL,
    headers            TEXT NOT NULL,     -- JSON object of strings
    idempotency_key    TEXT,
    origin_region      TEXT NOT NULL,
    accepted_at        BIGINT NOT NULL,   -- microseconds since the Unix epoch
    traceparent        TEXT,
    spooled_at         BIGINT NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT
);

-- What a drainer reads: one destination's messages in order.
CREATE INDEX spool_by_destination ON spool (destination_region, position);

-- What every send to another region asks: does the sender have messages
-- for this recipient waiting in the spool (then this one waits behind).
CREATE INDEX spool_by_sender ON spool (sender_id, recipient_id);
