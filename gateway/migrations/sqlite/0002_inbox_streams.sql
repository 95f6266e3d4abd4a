-- The newest Receive stream of each inbox: every stream that opens takes the
-- next epoch, and a stream whose epoch is no longer the newest ends.
CREATE TABLE inbox_streams (
    recipient_id TEXT PRIMARY KEY NOT NULL,
    epoch        INTEGER NOT NULL
);
