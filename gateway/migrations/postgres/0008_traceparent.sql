-- A message keeps the W3C trace context it was sent in, so that its
-- deliveries and events continue the sender's trace. NULL for messages
-- stored before messages carried one; adding a nullable column without a
-- default rewrites nothing.
ALTER TABLE messages ADD COLUMN traceparent TEXT;

-- The events of a batch carry their messages' traceparents, one more array
-- beside the others on the batch's one outbox row (NULL on rows written
-- before, and on rows of single events).
ALTER TABLE outbox ADD COLUMN traceparents TEXT[];
