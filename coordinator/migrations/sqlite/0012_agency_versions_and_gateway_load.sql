-- Each agency's own version: one more with every change of it (a move's
-- start, its cut-over or cancel), so a client can tell its entry changed.
ALTER TABLE agencies ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- The load a gateway last reported, so that every replica (and the
-- operator's `fedmesh status` on any of them) sees it.
ALTER TABLE gateway_instances ADD COLUMN open_streams BIGINT NOT NULL DEFAULT 0;
ALTER TABLE gateway_instances ADD COLUMN in_flight BIGINT NOT NULL DEFAULT 0;
