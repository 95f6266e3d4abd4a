-- Online moves of agencies between shards and regions. While a move is
-- under way its agency is `moving` (gateways hold writes to and from it);
-- the leader drives the move through its phases and cuts over by giving
-- the agency its new home, under the lease's fencing token.
ALTER TABLE agencies ADD COLUMN moving BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE agency_moves (
    move_id         TEXT PRIMARY KEY NOT NULL,
    agency_id       TEXT NOT NULL,
    from_region     TEXT NOT NULL,
    from_shard      TEXT NOT NULL,
    to_region       TEXT NOT NULL,
    to_shard        TEXT NOT NULL,
    -- copying, releasing, done, cancelling, cancelled
    phase           TEXT NOT NULL,
    messages_copied BIGINT NOT NULL DEFAULT 0,
    keys_copied     BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT NOT NULL DEFAULT '',
    started_at      BIGINT NOT NULL, -- microseconds since the Unix epoch
    updated_at      BIGINT NOT NULL
);

-- At most one move of an agency is under way.
CREATE UNIQUE INDEX agency_moves_under_way ON agency_moves (agency_id)
    WHERE phase IN ('copying', 'releasing', 'cancelling');
