-- A subscription delivered to a webhook: where notifiers POST its events
-- and the secret they sign them with (both NULL: delivered to streams).
ALTER TABLE subscriptions ADD COLUMN webhook_url TEXT;
ALTER TABLE subscriptions ADD COLUMN webhook_secret TEXT;
