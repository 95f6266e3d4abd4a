-- One shard: the inboxes of the agencies it holds, and the event outbox.

-- The last sequence handed out per inbox; sequences are dense from 1.
CREATE TABLE inboxes (
    recipient_id  TEXT PRIMARY KEY NOT NULL,
    last_sequence INTEGER NOT NULL
);

CREATE TABLE messages (
    message_id      TEXT PRIMARY KEY NOT NULL,
    recipient_id    TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    sender_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         BLOB NOT NULL,
    headers         TEXT NOT NULL,     -- JSON object of strings
    idempotency_key TEXT,
    origin_region   TEXT NOT NULL,
    accepted_at     INTEGER NOT NULL,  -- microseconds since the Unix epoch
    stored_at       INTEGER NOT NULL,
    acked_at        INTEGER,           -- NULL until the recipient acknowledged it
    UNIQUE (recipient_id, sequence)
);

-- A sender's idempotency key names one message.
CREATE UNIQUE INDEX messages_by_idempotency_key
    ON messages (sender_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- What Receive reads: the unacknowledged messages of one inbox in order.
CREATE INDEX messages_unacked ON messages (recipient_id, sequence) WHERE acked_at IS NULL;

CREATE TABLE outbox (
    row_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    region      TEXT NOT NULL,
    agency_id   TEXT NOT NULL,
    message_id  TEXT,
    occurred_at INTEGER NOT NULL,
    attributes  TEXT NOT NULL
);
