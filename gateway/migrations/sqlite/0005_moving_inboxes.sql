-- Moving an inbox to another shard online.
--
-- Before its messages are copied, the inbox is frozen on its old shard, and
-- from then on no statement may reserve a sequence of it: a gateway whose
-- topology still names the old shard (it has not heard of the move yet)
-- would otherwise store a message there after the copy, and the message
-- would be lost with the old shard's copy. The fence is in the database, not
-- in the gateways, so that it holds whatever a gateway believes. Every
-- batch reserves sequences by updating `last_sequence`; only the WHEN
-- clause runs for a batch that is let through.
ALTER TABLE inboxes ADD COLUMN frozen BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TRIGGER inboxes_refuse_frozen
    BEFORE UPDATE OF last_sequence ON inboxes
    FOR EACH ROW
    WHEN OLD.frozen AND NEW.last_sequence <> OLD.last_sequence
BEGIN
    SELECT RAISE(ABORT, 'fedmesh: inbox frozen');
END;
