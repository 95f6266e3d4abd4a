-- Coordinator replicas share the directory through the control database:
-- every change bumps this counter, and each replica reloads the directory
-- when it sees it move.
CREATE TABLE directory_version (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO directory_version (id, version) VALUES (1, 0);

-- The gateways that reported to any replica, and when last.
CREATE TABLE gateway_instances (
    gateway_id TEXT PRIMARY KEY NOT NULL,
    region     TEXT NOT NULL,
    address    TEXT NOT NULL,
    last_seen  BIGINT NOT NULL -- microseconds since the Unix epoch
);
