-- A customer's address book. At most one default shipping address each,
-- enforced by the partial unique index.
CREATE TABLE addresses (
    id          uuid PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id),
    full_name   text        NOT NULL,
    line1       text        NOT NULL,
    line2       text        NOT NULL DEFAULT '',
    city        text        NOT NULL,
    region      text        NOT NULL DEFAULT '',
    postal_code text        NOT NULL,
    country     text        NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    phone       text        NOT NULL DEFAULT '',
    is_default  boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX addresses_user ON addresses (user_id, created_at);
CREATE UNIQUE INDEX addresses_one_default ON addresses (user_id) WHERE is_default;
