-- A message keeps the W3C trace context it was sent in, so that its
-- deliveries and events continue the sender's trace. NULL for messages
-- stored before messages carried one. The events of a batch list each
-- message's traceparent as a sixth element of their outbox row's
-- `entries`, which needs no change here.
ALTER TABLE messages ADD COLUMN traceparent TEXT;
