-- The capsule registry: capsules, their versions (archives are on disk, content-addressed),
-- publisher keys, installations (the install history), approvals, and AIP-155 request ids.
-- Enum columns hold the soma.capsule.v1 enum numbers.

CREATE TABLE IF NOT EXISTS capsule_capsules (
    name          text PRIMARY KEY,             -- the manifest name, global
    tenant        text NOT NULL,                -- the publishing (owning) tenant
    visibility    smallint NOT NULL,            -- CapsuleVisibility
    -- what the latest (highest not yanked) version says; refreshed on publish, yank, revoke
    latest_version text NOT NULL DEFAULT '',
    description   text NOT NULL DEFAULT '',
    permissions   text[] NOT NULL DEFAULT '{}',
    homepage      text NOT NULL DEFAULT '',
    license       text NOT NULL DEFAULT '',
    verified      boolean NOT NULL DEFAULT false,
    install_count bigint NOT NULL DEFAULT 0,
    create_time   timestamptz NOT NULL DEFAULT now(),
    update_time   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS capsule_capsules_tenant ON capsule_capsules (tenant);
CREATE INDEX IF NOT EXISTS capsule_capsules_installs ON capsule_capsules (install_count DESC, name);
CREATE INDEX IF NOT EXISTS capsule_capsules_updated ON capsule_capsules (update_time DESC, name);

CREATE TABLE IF NOT EXISTS capsule_versions (
    capsule          text NOT NULL REFERENCES capsule_capsules (name),
    version          text NOT NULL,
    sort_key         text COLLATE "C" NOT NULL,  -- byte order = SemVer precedence
    tenant           text NOT NULL,
    digest           text NOT NULL,              -- sha256:<hex>: the blob's name
    size_bytes       bigint NOT NULL,
    entry_count      bigint NOT NULL,
    unpacked_bytes   bigint NOT NULL,
    manifest         jsonb NOT NULL,             -- CapsuleManifest fields
    signature_format smallint NOT NULL,          -- SignatureFormat
    signature        text NOT NULL,              -- base64 DER
    publisher_key    uuid,                       -- the key that verified it at publish
    key_fingerprint  text NOT NULL DEFAULT '',
    verify_result    smallint NOT NULL,          -- VerificationResult of the last check
    verify_time      timestamptz NOT NULL DEFAULT now(),
    yanked           boolean NOT NULL DEFAULT false,
    yank_reason      text NOT NULL DEFAULT '',
    yank_time        timestamptz,
    uploader         text NOT NULL,
    publish_time     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (capsule, version)
);
CREATE INDEX IF NOT EXISTS capsule_versions_order ON capsule_versions (capsule, sort_key DESC);
CREATE INDEX IF NOT EXISTS capsule_versions_key ON capsule_versions (publisher_key);

CREATE TABLE IF NOT EXISTS capsule_publisher_keys (
    id             uuid PRIMARY KEY,
    tenant         text NOT NULL,
    display_name   text NOT NULL DEFAULT '',
    public_key_pem text NOT NULL,
    fingerprint    text NOT NULL,               -- sha256:<hex of DER SubjectPublicKeyInfo>
    key_hint       text NOT NULL,               -- what a Sigstore bundle's publicKey.hint holds
    state          smallint NOT NULL,           -- PublisherKeyState
    creator        text NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now(),
    revoke_time    timestamptz,
    revoke_reason  text NOT NULL DEFAULT '',
    request_id     text,
    pos            bigserial UNIQUE NOT NULL,
    UNIQUE (tenant, fingerprint),
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS capsule_publisher_keys_tenant ON capsule_publisher_keys (tenant, pos DESC);

CREATE TABLE IF NOT EXISTS capsule_installations (
    id              uuid PRIMARY KEY,
    tenant          text NOT NULL,
    capsule         text NOT NULL,
    version         text NOT NULL,
    digest          text NOT NULL,
    requester       text NOT NULL,               -- subject, e.g. key:<id> or user:<sub>
    requester_owner text NOT NULL,               -- who owns that credential (never approves)
    state           smallint NOT NULL,           -- InstallationState
    approval        uuid,
    path            text NOT NULL DEFAULT '',    -- relative to the tenant's capsules directory
    file_count      bigint NOT NULL DEFAULT 0,
    size_bytes      bigint NOT NULL DEFAULT 0,
    error_code      int NOT NULL DEFAULT 0,      -- google.rpc.Code; 0 = none
    error_message   text NOT NULL DEFAULT '',
    error_reason    text NOT NULL DEFAULT '',    -- ErrorInfo reason
    -- live progress, for streams attached on another replica
    phase           smallint NOT NULL DEFAULT 1, -- InstallPhase
    percent         real NOT NULL DEFAULT 0,
    files_done      bigint NOT NULL DEFAULT 0,
    files_total     bigint NOT NULL DEFAULT 0,
    bytes_done      bigint NOT NULL DEFAULT 0,
    bytes_total     bigint NOT NULL DEFAULT 0,
    message         text NOT NULL DEFAULT '',
    replica         text NOT NULL,               -- the replica running the install
    heartbeat_time  timestamptz NOT NULL DEFAULT now(),
    create_time     timestamptz NOT NULL DEFAULT now(),
    complete_time   timestamptz,
    remove_time     timestamptz,
    remover         text NOT NULL DEFAULT '',
    request_id      text,
    pos             bigserial UNIQUE NOT NULL,
    UNIQUE (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS capsule_installations_tenant ON capsule_installations (tenant, pos DESC);
CREATE INDEX IF NOT EXISTS capsule_installations_capsule
    ON capsule_installations (tenant, capsule, state);
CREATE INDEX IF NOT EXISTS capsule_installations_running
    ON capsule_installations (replica, state) WHERE state IN (1, 2);
-- At most one INSTALLED installation per tenant and capsule.
CREATE UNIQUE INDEX IF NOT EXISTS capsule_installations_current
    ON capsule_installations (tenant, capsule) WHERE state = 3;

CREATE TABLE IF NOT EXISTS capsule_approvals (
    id              uuid PRIMARY KEY,
    tenant          text NOT NULL,
    installation    uuid NOT NULL,
    capsule         text NOT NULL,
    version         text NOT NULL,
    permissions     text[] NOT NULL DEFAULT '{}',
    requester       text NOT NULL,
    requester_owner text NOT NULL,
    policy_reason   text NOT NULL,
    state           smallint NOT NULL,           -- ApprovalState
    approver        text NOT NULL DEFAULT '',
    comment         text NOT NULL DEFAULT '',
    create_time     timestamptz NOT NULL DEFAULT now(),
    expire_time     timestamptz NOT NULL,
    decide_time     timestamptz,
    pos             bigserial UNIQUE NOT NULL
);
CREATE INDEX IF NOT EXISTS capsule_approvals_tenant ON capsule_approvals (tenant, pos DESC);
CREATE INDEX IF NOT EXISTS capsule_approvals_pending
    ON capsule_approvals (expire_time) WHERE state = 1;

-- AIP-155 request ids of methods without a request_id column of their own: a repeat of
-- (tenant, request_id) returns the current resource and changes nothing. Pruned after a week.
CREATE TABLE IF NOT EXISTS capsule_requests (
    tenant      text NOT NULL,
    request_id  text NOT NULL,
    method      text NOT NULL,
    resource    text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);
