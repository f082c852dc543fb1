-- Accounts: customers, sellers (each with one shop) and admins.
CREATE TABLE users (
    id                uuid PRIMARY KEY,
    email             text        NOT NULL,
    password_hash     text,                      -- NULL for accounts that only sign in with SSO
    name              text        NOT NULL,
    role              text        NOT NULL CHECK (role IN ('customer', 'seller', 'admin')),
    email_verified_at timestamptz,
    suspended_at      timestamptz,
    suspended_reason  text,
    avatar            text,                      -- file name under avatars/<id>/ in the object store
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- Emails are unique regardless of case; the constraint name maps to the field.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE shops (
    id            uuid PRIMARY KEY,
    owner_id      uuid        NOT NULL UNIQUE REFERENCES users (id),
    name          text        NOT NULL,
    slug          text        NOT NULL CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$'),
    description   text        NOT NULL DEFAULT '',
    contact_email text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX shops_slug_key ON shops (slug);

-- Single-use tokens mailed to users (email verification, password reset).
-- Only a SHA-256 of the token is stored.
CREATE TABLE user_tokens (
    token_hash bytea       PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id),
    purpose    text        NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_tokens_user ON user_tokens (user_id, purpose);

-- Rotating refresh tokens. Each sign-in starts a family; each refresh
-- rotates to a new token of the same family. Presenting a rotated token again
-- means it leaked: the whole family is revoked.
CREATE TABLE refresh_tokens (
    id         uuid PRIMARY KEY,
    family_id  uuid        NOT NULL,
    user_id    uuid        NOT NULL REFERENCES users (id),
    token_hash bytea       NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Every admin action: who, what, on what, when and why. Append-only.
CREATE TABLE audit_log (
    id          uuid PRIMARY KEY,
    actor_id    uuid        NOT NULL REFERENCES users (id),
    action      text        NOT NULL,
    target_type text        NOT NULL,
    target_id   uuid        NOT NULL,
    reason      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id, at);
