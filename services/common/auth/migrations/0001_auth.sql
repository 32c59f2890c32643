-- Tenants, API keys, relationship tuples (role bindings) and per-key rate windows: shared by
-- every service (each verifies callers itself), owned by the Keys service for writes.
CREATE TABLE IF NOT EXISTS auth_tenants (
    id              text PRIMARY KEY,
    display_name    text NOT NULL DEFAULT '',
    enterprise_mode boolean NOT NULL DEFAULT false,
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS auth_api_keys (
    id                          text PRIMARY KEY,          -- the key id (public)
    tenant                      text NOT NULL,
    owner                       text NOT NULL,             -- e.g. user:alice or key:<id>
    display_name                text NOT NULL DEFAULT '',
    scopes                      text[] NOT NULL DEFAULT '{}',
    roles                       text[] NOT NULL DEFAULT '{}',
    secret_hash                 bytea NOT NULL,            -- HMAC-SHA-256(pepper, key text)
    previous_secret_hash        bytea,                     -- valid until the grace period ends
    previous_secret_expire_time timestamptz,
    state                       smallint NOT NULL,         -- soma.keys.v1.ApiKeyState
    expire_time                 timestamptz,
    usage_budget                bigint,                    -- null or 0: unlimited
    remaining_calls             bigint,
    rate_limit_per_minute       int,                       -- null or 0: no limit
    last_used_time              timestamptz,
    create_time                 timestamptz NOT NULL DEFAULT now(),
    update_time                 timestamptz NOT NULL DEFAULT now(),
    rotate_time                 timestamptz,
    revoke_time                 timestamptz,
    revoke_reason               text,
    request_id                  text,
    pos                         bigserial UNIQUE NOT NULL, -- insertion order, for keyset paging
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS auth_api_keys_tenant_pos ON auth_api_keys (tenant, pos DESC);
CREATE INDEX IF NOT EXISTS auth_api_keys_tenant_owner ON auth_api_keys (tenant, owner);

CREATE TABLE IF NOT EXISTS auth_role_bindings (
    id          uuid PRIMARY KEY,
    tenant      text NOT NULL,
    subject     text NOT NULL,
    relation    text NOT NULL,
    object      text NOT NULL,
    creator     text NOT NULL DEFAULT '',  -- who made the binding (RoleBinding.creator)
    create_time timestamptz NOT NULL DEFAULT now(),
    pos         bigserial UNIQUE NOT NULL,
    UNIQUE (subject, relation, object)
);
CREATE INDEX IF NOT EXISTS auth_role_bindings_object ON auth_role_bindings (object, relation);
CREATE INDEX IF NOT EXISTS auth_role_bindings_tenant_pos ON auth_role_bindings (tenant, pos);

-- One row per key and minute, only for keys with rate_limit_per_minute; old rows are pruned
-- by the process that flushes last_used_time.
CREATE TABLE IF NOT EXISTS auth_rate_windows (
    key_id       text NOT NULL,
    window_start timestamptz NOT NULL,
    calls        int NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, window_start)
);
