-- The outbox has the same columns in every database (one reader drains
-- them all): a shard writes the events of a batch of messages as one row
-- listing them. The coordinator writes one row per event.
CREATE TABLE outbox_listing (
    row_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT,
    kind        TEXT NOT NULL,
    region      TEXT NOT NULL,
    agency_id   TEXT,
    message_id  TEXT,
    occurred_at INTEGER NOT NULL,
    attributes  TEXT,
    entries     TEXT
);
INSERT INTO outbox_listing (row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes)
SELECT row_id, event_id, kind, region, agency_id, message_id, occurred_at, attributes FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_listing RENAME TO outbox;
