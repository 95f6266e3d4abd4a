-- Ids are compared byte by byte: the "C" collation makes every index lookup
-- and insert on them a memcmp instead of a locale-aware comparison (their
-- order means nothing, and they are ASCII).
ALTER TABLE messages
    ALTER COLUMN message_id TYPE TEXT COLLATE "C",
    ALTER COLUMN recipient_id TYPE TEXT COLLATE "C",
    ALTER COLUMN sender_id TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C";
ALTER TABLE inboxes ALTER COLUMN recipient_id TYPE TEXT COLLATE "C";
ALTER TABLE inbox_streams ALTER COLUMN recipient_id TYPE TEXT COLLATE "C";
ALTER TABLE idempotency_keys
    ALTER COLUMN sender_id TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";

-- An outbox row listing a batch of messages stays in the table page, not
-- compressed into TOAST, up to the size of a page.
ALTER TABLE outbox SET (toast_tuple_target = 8160);
