-- The retention purge finds old acknowledged messages by the time they were
-- stored (acknowledged before the cutoff means stored before it too), which
-- follows the order rows are written: a BRIN index, cheap to keep, instead
-- of a scan of the whole table.
CREATE INDEX messages_by_age ON messages USING brin (stored_at);

-- The arrays of an outbox row listing a batch (ids: random bytes) do not
-- compress: a large row goes out of line as it is, without trying.
ALTER TABLE outbox
    ALTER COLUMN message_ids SET STORAGE EXTERNAL,
    ALTER COLUMN recipient_ids SET STORAGE EXTERNAL,
    ALTER COLUMN sender_ids SET STORAGE EXTERNAL,
    ALTER COLUMN message_kinds SET STORAGE EXTERNAL,
    ALTER COLUMN sequences SET STORAGE EXTERNAL;
