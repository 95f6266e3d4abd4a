-- Acknowledged messages are told apart by a watermark per inbox instead of
-- a partial index: every message up to `acked_through` is acknowledged
-- (those acknowledged out of order above it carry their acked_at). A send
-- then maintains one index fewer, and an ack changes no indexed column, so
-- it updates the row in place (HOT) where its page has room.
CREATE TABLE inbox_acks (
    recipient_id  TEXT COLLATE "C" PRIMARY KEY,
    acked_through BIGINT NOT NULL
);

INSERT INTO inbox_acks (recipient_id, acked_through)
SELECT inboxes.recipient_id,
       COALESCE((SELECT min(sequence) - 1 FROM messages
                 WHERE messages.recipient_id = inboxes.recipient_id AND acked_at IS NULL),
                inboxes.last_sequence)
FROM inboxes;

DROP INDEX messages_unacked;

-- Room in each page for the acked_at an ack sets.
ALTER TABLE messages SET (fillfactor = 90);

-- The retention purge finds old messages by the time they were stored,
-- which follows the order rows are written: a BRIN index, cheap to keep.
CREATE INDEX messages_by_age ON messages USING brin (stored_at);
