-- Who may send whom what: a sender ('' for any agency) may send a recipient
-- messages of the listed kinds (JSON array; empty for any kind).
CREATE TABLE access_grants (
    grant_id     TEXT PRIMARY KEY NOT NULL,
    sender_id    TEXT NOT NULL,
    recipient_id TEXT NOT NULL,
    kinds        TEXT NOT NULL,
    granted_at   BIGINT NOT NULL, -- microseconds since the Unix epoch
    granted_by   TEXT NOT NULL
);

-- The audit log: denied calls and privileged actions, one hash chain per
-- region ("global" for what concerns no region). Each row's hash covers its
-- fields and the previous row's hash; `fedmesh audit verify` recomputes them.
CREATE TABLE audit_log (
    chain     TEXT NOT NULL,
    seq       BIGINT NOT NULL,  -- 1, 2, ... within the chain
    at        BIGINT NOT NULL,  -- microseconds since the Unix epoch
    actor     TEXT NOT NULL,    -- the identity that acted or called
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,    -- "ok", or the status code name of a refusal
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    PRIMARY KEY (chain, seq)
);
