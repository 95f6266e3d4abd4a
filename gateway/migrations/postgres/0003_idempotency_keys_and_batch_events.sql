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
    fingerprint     BYTEA,
    message_id      TEXT NOT NULL,
    claimed_at      BIGINT NOT NULL,   -- microseconds since the Unix epoch
    PRIMARY KEY (sender_id, idempotency_key)
);

-- Keys are forgotten after the retention period, oldest first. Claims come
-- in time order, which a BRIN index follows at little cost per insert.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys USING brin (claimed_at);

INSERT INTO idempotency_keys (sender_id, idempotency_key, fingerprint, message_id, claimed_at)
SELECT sender_id, idempotency_key, NULL, message_id, stored_at
FROM messages WHERE idempotency_key IS NOT NULL;

DROP INDEX messages_by_idempotency_key;

-- The events of a batch of messages (stored, acknowledged) are one row whose
-- arrays list the messages; other events keep a row each.
ALTER TABLE outbox
    ALTER COLUMN event_id DROP NOT NULL,
    ALTER COLUMN agency_id DROP NOT NULL,
    ALTER COLUMN attributes DROP NOT NULL,
    ADD COLUMN message_ids   TEXT[],
    ADD COLUMN recipient_ids TEXT[],
    ADD COLUMN sender_ids    TEXT[],
    ADD COLUMN message_kinds TEXT[],
    ADD COLUMN sequences     BIGINT[];
