-- One grant per right: granting the same sender, recipient and kinds twice
-- at the same instant keeps one row.
CREATE UNIQUE INDEX access_grants_by_right ON access_grants (recipient_id, sender_id, kinds);
