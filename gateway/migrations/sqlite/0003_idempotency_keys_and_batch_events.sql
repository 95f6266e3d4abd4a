-- Idempotency keys that hold across shards, and outbox rows that list the
-- messages of a batch.
--
-- An idempotency key names one message per sender across the mesh. Its
-- claim lives in the sender's home shard with a fingerprint (SHA-256) of
-- what was sent under it; keys claimed before this migration have none and
-- match any content.
CREATE TABLE idempotency_keys (
    sender_id       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     BLOB,
    message_id      TEXT NOT NULL,
    claimed_at      INTEGER NOT NULL,  -- microseconds since the Unix epoch
    PRIMARY KEY (sender_id, idempotency_key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (claimed_at);

INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at)
SELECT sender_id, idempotency_key, NULL, message_id, stored_at
FROM messages WHERE idempotency_key IS NOT NULL;

DROP INDEX messages_by_idempotency_key;

-- The events of a batch of messages (stored, acknowledged) are one row
-- whose `entries` list the messages (JSON: [id, recipient, sender, kind,
-- sequence] each); other events keep a row each.
CREATE TABLE outbox_listing (
    row_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT,
    kind        TEXT NOT NULL,
    region      TEXT NOT NULL,
    agency_id   TEXT,
    message_id  TEXT,
    occurred_at INTEGER NOT NULL,
    attributes  TEXT,
    entries     TEXT
);
INSERT INTO outbox_listing (row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes)
SELECT row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_listing RENAME TO outbox;
