-- Moving an inbox to another shard online.
--
-- Before its messages are copied, the inbox is frozen on its old shard, and
-- from then on no statement may reserve a sequence of it: a gateway whose
-- topology still names the old shard (it has not heard of the move yet, or
-- never will before it writes) would otherwise store a message there after
-- the copy, and the message would be lost with the old shard's copy. The
-- fence is in the database, not in the gateways, so that it holds whatever
-- a gateway believes; its error (SQLSTATE FM001, ours) tells the gateway to
-- look the frozen inboxes up and refuse their messages.
--
-- Every batch reserves sequences by updating `last_sequence` under the
-- inbox's row lock, so freezing the inbox waits for the batch in flight and
-- every later batch meets the fence. Only the trigger's WHEN clause runs on
-- the hot path: the function runs when it refuses.
ALTER TABLE inboxes ADD COLUMN frozen BOOLEAN NOT NULL DEFAULT FALSE;

CREATE FUNCTION fedmesh_refuse_frozen_inbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fedmesh: inbox % is frozen: it has moved or is moving to another shard',
        OLD.recipient_id
        USING ERRCODE = 'FM001';
END
$$;

CREATE TRIGGER inboxes_refuse_frozen
    BEFORE UPDATE OF last_sequence ON inboxes
    FOR EACH ROW
    WHEN (OLD.frozen AND NEW.last_sequence <> OLD.last_sequence)
    EXECUTE FUNCTION fedmesh_refuse_frozen_inbox();

-- A move copies an inbox's acknowledged messages too (their ids keep
-- relayed copies from being stored twice), in sequence order; the index
-- that reads use covers only unacknowledged ones. This one is written on
-- acknowledgement, not on send.
CREATE INDEX messages_acked ON messages (recipient_id, sequence) WHERE acked_at IS NOT NULL;
