-- Sequences are unique per inbox by construction (each batch reserves its
-- range under the inbox's row lock); the index that checks it need not cover
-- acknowledged messages. The partial index reads use becomes the unique one,
-- and a send maintains one index fewer.
DROP INDEX messages_unacked;
CREATE UNIQUE INDEX messages_unacked ON messages (recipient_id, sequence) WHERE acked_at IS NULL;
ALTER TABLE messages DROP CONSTRAINT messages_recipient_id_sequence_key;
