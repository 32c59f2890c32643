-- Audit events, one hash chain per tenant (services/common/audit/chain.py). `payload` is the
-- event as received, binary protobuf without the chain fields: verification recomputes every
-- hash from it, and checks that the query columns next to it still say the same thing.
CREATE TABLE IF NOT EXISTS audit_events (
    tenant          text NOT NULL,
    sequence        bigint NOT NULL,
    id              text NOT NULL,
    event_time      timestamptz NOT NULL,
    ingest_time     timestamptz NOT NULL,
    actor_subject   text NOT NULL,
    actor_key_id    text NOT NULL,
    actor_token_kid text NOT NULL,
    method          text NOT NULL,
    resource        text NOT NULL,
    decision        smallint NOT NULL,
    status_code     integer NOT NULL,
    request_id      text NOT NULL,
    previous_hash   text NOT NULL,
    hash            text NOT NULL,
    payload         bytea NOT NULL,
    PRIMARY KEY (tenant, sequence)
);
-- Dedupe: an event id is stored once (the writer checks before chaining; this is the backstop).
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_id ON audit_events (id);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (tenant, event_time, sequence);

-- The head of each tenant's chain, locked (FOR UPDATE) by the writer while it appends.
CREATE TABLE IF NOT EXISTS audit_chain_heads (
    tenant      text PRIMARY KEY,
    sequence    bigint NOT NULL DEFAULT 0,
    hash        text NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000',
    update_time timestamptz NOT NULL DEFAULT now()
);

-- The last event retention dropped from each chain: what remains verifies from here.
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    tenant         text PRIMARY KEY,
    sequence       bigint NOT NULL,
    hash           text NOT NULL,
    event_time     timestamptz,
    events_dropped bigint NOT NULL DEFAULT 0,
    create_time    timestamptz NOT NULL DEFAULT now()
);

-- Retention policies; no row (or 0 seconds) keeps events forever.
CREATE TABLE IF NOT EXISTS audit_retention (
    tenant            text PRIMARY KEY,
    retention_seconds bigint NOT NULL DEFAULT 0,
    last_purge_time   timestamptz,
    update_time       timestamptz NOT NULL DEFAULT now()
);
