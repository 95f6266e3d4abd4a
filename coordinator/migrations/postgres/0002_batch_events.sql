-- The outbox has the same columns in every database (one reader drains
-- them all): a shard writes the events of a batch of messages as one row of
-- arrays. The coordinator writes one row per event.
ALTER TABLE outbox
    ALTER COLUMN event_id DROP NOT NULL,
    ALTER COLUMN agency_id DROP NOT NULL,
    ALTER COLUMN attributes DROP NOT NULL,
    ADD COLUMN message_ids   TEXT[],
    ADD COLUMN recipient_ids TEXT[],
    ADD COLUMN sender_ids    TEXT[],
    ADD COLUMN message_kinds TEXT[],
    ADD COLUMN sequences     BIGINT[];
