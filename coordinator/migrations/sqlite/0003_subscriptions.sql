-- Durable subscriptions: a named filter whose events the bus keeps (in a
-- queue of the subscription's own) until a subscriber acknowledges them.
CREATE TABLE subscriptions (
    name         TEXT PRIMARY KEY NOT NULL,
    owner        TEXT NOT NULL,   -- identity: agency/<id> or operator/<name>
    filter       TEXT NOT NULL,   -- JSON: {"regions": [...], "agencies": [...], "kinds": [...]}
    strict_order INTEGER NOT NULL,
    created_at   INTEGER NOT NULL -- microseconds since the Unix epoch
);
