-- The newest Receive stream of each inbox: every stream that opens takes the
-- next epoch (announced on the fedmesh_streams channel), and a stream whose
-- epoch is no longer the newest ends, on whichever replica it is.
CREATE TABLE inbox_streams (
    recipient_id TEXT PRIMARY KEY,
    epoch        BIGINT NOT NULL
);
