-- Sessions, their messages (user messages double as the outbox: published_at is null until
-- JetStream acknowledged them), and each session's ordered event log.
CREATE TABLE IF NOT EXISTS gateway_sessions (
    id            uuid PRIMARY KEY,
    pos           bigserial UNIQUE NOT NULL,   -- insertion order, for keyset paging
    tenant        text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    agent         text NOT NULL,
    labels        jsonb NOT NULL DEFAULT '{}',
    state         smallint NOT NULL,
    partition     int NOT NULL,
    message_count bigint NOT NULL DEFAULT 0,
    last_seq      bigint NOT NULL DEFAULT 0,
    request_id    text,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now(),
    close_time    timestamptz,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS gateway_sessions_tenant_pos ON gateway_sessions (tenant, pos DESC);

CREATE TABLE IF NOT EXISTS gateway_messages (
    id           uuid PRIMARY KEY,
    pos          bigserial UNIQUE NOT NULL,
    session_id   uuid NOT NULL REFERENCES gateway_sessions (id),
    tenant       text NOT NULL,
    partition    int NOT NULL,
    role         smallint NOT NULL,
    content      text NOT NULL,
    tool         text NOT NULL,
    state        smallint NOT NULL,
    reply        uuid,              -- user message: its answer; agent message: what it answers
    cache_hit    boolean NOT NULL DEFAULT false,
    error        text NOT NULL DEFAULT '',
    request_id   text,
    published_at timestamptz,
    create_time  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, request_id)
);
CREATE INDEX IF NOT EXISTS gateway_messages_session_pos ON gateway_messages (session_id, pos);
CREATE INDEX IF NOT EXISTS gateway_messages_outbox ON gateway_messages (create_time)
    WHERE published_at IS NULL AND role = 1;

CREATE TABLE IF NOT EXISTS gateway_session_events (
    session_id  uuid NOT NULL REFERENCES gateway_sessions (id),
    seq         bigint NOT NULL,
    payload     bytea NOT NULL,     -- a serialized soma.gateway.v1.SessionEvent
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);
