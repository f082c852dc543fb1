-- Transactional outbox: written in the same transaction as the change it
-- announces; the outbox relay publishes rows and stamps published_at only
-- after the broker confirms them.
CREATE TABLE outbox (
    id             uuid PRIMARY KEY,
    routing_key    text        NOT NULL,
    envelope       jsonb       NOT NULL,
    correlation_id text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);

-- The relay only ever scans unpublished rows, oldest first.
CREATE INDEX outbox_unpublished ON outbox (created_at, id) WHERE published_at IS NULL;

-- Relays are woken by a NOTIFY sent after commit, outside the producing
-- transaction (shared/src/outbox.rs, Waker): a NOTIFY inside it would hold
-- PostgreSQL's global notify lock through every commit's WAL flush and
-- serialize all producers (measured: 2,700 vs 7,900 inserts/s).

-- Exactly-once effects: a consumer inserts (consumer, message_id) in the same
-- transaction as its effect; a redelivered message finds the row and is skipped.
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    attempt      integer     NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- One row per email the mailer sent, keyed by the message that asked for it.
CREATE TABLE email_log (
    message_id uuid PRIMARY KEY,
    recipient  text        NOT NULL,
    template   text        NOT NULL,
    subject    text        NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now()
);

-- Support requests from the storefront's contact form.
CREATE TABLE support_requests (
    id             uuid PRIMARY KEY,
    email          text        NOT NULL,
    name           text        NOT NULL,
    subject        text        NOT NULL,
    message        text        NOT NULL,
    correlation_id text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Leases for handlers with an outside effect (SMTP, Stripe): a consumer
-- claims a message before the outside call so a concurrent duplicate backs
-- off instead of repeating it. A crashed holder's claim simply expires.
CREATE TABLE message_claims (
    consumer      text        NOT NULL,
    message_id    uuid        NOT NULL,
    claimed_until timestamptz NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
