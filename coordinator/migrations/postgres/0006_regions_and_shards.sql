-- Regions and their shard databases, as data operators change at run
-- time (the coordinator's --region flags seed them).
CREATE TABLE regions (
    name       TEXT PRIMARY KEY NOT NULL,
    created_at BIGINT NOT NULL -- microseconds since the Unix epoch
);

CREATE TABLE shards (
    name       TEXT PRIMARY KEY NOT NULL,
    region     TEXT NOT NULL REFERENCES regions (name),
    address    TEXT NOT NULL,  -- for operators: host and database, no credentials
    draining   BOOLEAN NOT NULL,
    capacity   BIGINT NOT NULL, -- most agencies; 0: no limit
    created_at BIGINT NOT NULL
);
