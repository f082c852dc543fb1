-- Single sign-on with OpenID Connect.

-- A sign-in that was started and not yet finished: the browser is at the
-- provider. Keyed by a SHA-256 of the `state` parameter; single use; short
-- lived. The PKCE verifier and the nonce never leave the server.
CREATE TABLE oidc_logins (
    state_hash    bytea       PRIMARY KEY,
    nonce         text        NOT NULL,
    code_verifier text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oidc_logins_expiry ON oidc_logins (expires_at);

-- An account's identity at a provider: the issuer and its stable subject
-- (never the email, which can change or be reassigned at the provider).
CREATE TABLE user_identities (
    issuer          text        NOT NULL,
    subject         text        NOT NULL,
    user_id         uuid        NOT NULL REFERENCES users (id),
    email           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_sign_in_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);
CREATE INDEX user_identities_user ON user_identities (user_id);
