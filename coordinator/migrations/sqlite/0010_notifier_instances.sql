-- The notifiers that reported to any replica, and when last.
CREATE TABLE notifier_instances (
    notifier_id TEXT PRIMARY KEY NOT NULL,
    address     TEXT NOT NULL,
    last_seen   BIGINT NOT NULL -- microseconds since the Unix epoch
);
