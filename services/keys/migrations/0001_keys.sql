-- AIP-155 request ids of Keys methods that have no request_id column of their own (every
-- method but CreateApiKey): a repeat of (tenant, request_id) returns the current resource and
-- changes nothing. Rows older than a week are pruned at start.
CREATE TABLE IF NOT EXISTS keys_requests (
    tenant      text NOT NULL,
    request_id  text NOT NULL,
    method      text NOT NULL,
    resource    text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, request_id)
);
