-- The outbox relay (`fedmesh_common::postgres::PgOutbox`) reads the same
-- columns on every database it drains; gateways' shards list their
-- messages' traceparents in this array. The coordinator writes no rows
-- that list messages, so here it stays NULL.
ALTER TABLE outbox ADD COLUMN traceparents TEXT[];
