-- One shard: the inboxes of the agencies it holds, and the event outbox.

-- The last sequence handed out per inbox; sequences are dense from 1.
CREATE TABLE inboxes (
    recipient_id  TEXT PRIMARY KEY,
    last_sequence BIGINT NOT NULL
);

CREATE TABLE messages (
    message_id      TEXT PRIMARY KEY,
    recipient_id    TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    sender_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    headers         TEXT NOT NULL,     -- JSON object of strings
    idempotency_key TEXT,
    origin_region   TEXT NOT NULL,
    accepted_at     BIGINT NOT NULL,   -- microseconds since the Unix epoch
    stored_at       BIGINT NOT NULL,
    acked_at        BIGINT,            -- NULL until the recipient acknowledged it
    UNIQUE (recipient_id, sequence)
);

-- A sender's idempotency key names one message.
CREATE UNIQUE INDEX messages_by_idempotency_key
    ON messages (sender_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- What Receive reads: the unacknowledged messages of one inbox in order.
CREATE INDEX messages_unacked ON messages (recipient_id, sequence) WHERE acked_at IS NULL;

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
