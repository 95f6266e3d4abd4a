-- Acknowledged messages are told apart by a watermark per inbox instead of
-- a partial index: every message up to `acked_through` is acknowledged
-- (those acknowledged out of order above it carry their acked_at).
CREATE TABLE inbox_acks (
    recipient_id  TEXT PRIMARY KEY NOT NULL,
    acked_through INTEGER NOT NULL
);

INSERT INTO inbox_acks (recipient_id, acked_through)
SELECT inboxes.recipient_id,
       COALESCE((SELECT min(sequence) - 1 FROM messages
                 WHERE messages.recipient_id = inboxes.recipient_id AND acked_at IS NULL),
                inboxes.last_sequence)
FROM inboxes;

DROP INDEX messages_unacked;

-- The retention purge finds old messages by the time they were stored.
CREATE INDEX messages_by_age ON messages (stored_at);
