-- The retention purge finds old acknowledged messages by the time they were
-- stored (acknowledged before the cutoff means stored before it too).
CREATE INDEX messages_by_age ON messages (stored_at);
