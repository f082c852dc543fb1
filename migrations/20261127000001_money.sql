-- Marketplace money and operations: the double-entry ledger, settlement of
-- delivered seller orders, withdrawals, refund requests, and the admins'
-- control over shops. docs/ledger.md has the accounts and every posting.

-- Shops are approved by an admin before they sell (SELLER_APPROVAL=manual),
-- and can be suspended. Shops that exist already, and shops made by admins
-- or seeds, are approved from the start.
ALTER TABLE shops
    ADD COLUMN approved_at      timestamptz DEFAULT now(),
    ADD COLUMN suspended_at     timestamptz,
    ADD COLUMN suspended_reason text;
CREATE INDEX shops_awaiting_approval ON shops (created_at) WHERE approved_at IS NULL;

-- Accounts: per seller (pending, available, withdrawing) and the
-- platform's (payments clearing, commission, refunds, payouts, and the
-- customers' cards money comes from). A balance is the sum of the
-- account's entries, never stored on its own.
CREATE TABLE ledger_accounts (
    id         uuid PRIMARY KEY,
    kind       text        NOT NULL CHECK (kind IN (
                   'seller_pending', 'seller_available', 'seller_withdrawing',
                   'payments_clearing', 'commission', 'refunds', 'payouts', 'customer_funds')),
    shop_id    uuid REFERENCES shops (id),
    currency   text        NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind LIKE 'seller_%') = (shop_id IS NOT NULL))
);
CREATE UNIQUE INDEX ledger_accounts_key
    ON ledger_accounts (kind, coalesce(shop_id, '00000000-0000-0000-0000-000000000000'), currency);

-- One business event each. `reference` names what it records (for example
-- `earning:<seller order>`), unique, so each is posted exactly once however
-- often its message is delivered.
CREATE TABLE ledger_transactions (
    id              uuid PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN (
                        'payment', 'earning', 'release', 'refund',
                        'withdrawal_hold', 'withdrawal_paid', 'withdrawal_returned')),
    reference       text        NOT NULL UNIQUE,
    description     text        NOT NULL,
    order_id        uuid REFERENCES orders (id),
    seller_order_id uuid REFERENCES seller_orders (id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
    id             uuid PRIMARY KEY,
    transaction_id uuid        NOT NULL REFERENCES ledger_transactions (id),
    account_id     uuid        NOT NULL REFERENCES ledger_accounts (id),
    amount_minor   bigint      NOT NULL CHECK (amount_minor <> 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, created_at DESC);
CREATE INDEX ledger_entries_transaction ON ledger_entries (transaction_id);

-- Append-only: entries and transactions are never changed or removed; a
-- mistake is corrected by a new transaction.
CREATE FUNCTION souk_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION souk_ledger_append_only();
CREATE TRIGGER ledger_transactions_append_only BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION souk_ledger_append_only();

-- Balanced: at commit, every transaction's entries sum to zero.
CREATE FUNCTION souk_ledger_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
BEGIN
    SELECT coalesce(sum(amount_minor), 0) INTO total
      FROM ledger_entries WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % does not balance (off by %)', NEW.transaction_id, total;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION souk_ledger_balanced();

-- A delivered seller order's earnings: pending until `available_at`, then
-- released to the seller's available balance by the settlement worker.
CREATE TABLE seller_earnings (
    seller_order_id uuid PRIMARY KEY REFERENCES seller_orders (id),
    shop_id         uuid        NOT NULL REFERENCES shops (id),
    currency        text        NOT NULL,
    -- What the seller keeps, net of commission and of refunds made before
    -- delivery; released as it is.
    amount_minor    bigint      NOT NULL,
    available_at    timestamptz NOT NULL,
    released_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX seller_earnings_due ON seller_earnings (available_at) WHERE released_at IS NULL;

-- Where a shop's withdrawals go. The account number is stored encrypted
-- (AES-256-GCM, key PAYOUT_DETAILS_KEY) and shown masked.
CREATE TABLE payout_details (
    shop_id          uuid PRIMARY KEY REFERENCES shops (id),
    holder_name      text        NOT NULL,
    iban_ciphertext  bytea       NOT NULL,
    iban_nonce       bytea       NOT NULL,
    iban_last4       text        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE withdrawals (
    id              uuid PRIMARY KEY,
    shop_id         uuid        NOT NULL REFERENCES shops (id),
    requested_by    uuid        NOT NULL REFERENCES users (id),
    amount_minor    bigint      NOT NULL CHECK (amount_minor > 0),
    currency        text        NOT NULL,
    status          text        NOT NULL DEFAULT 'requested' CHECK (status IN ('requested', 'paid', 'rejected')),
    -- The payout details as they were when asked (masked), for the record.
    iban_last4      text        NOT NULL,
    holder_name     text        NOT NULL,
    idempotency_key text,
    decided_by      uuid REFERENCES users (id),
    decision_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz
);
-- One open request per shop at a time.
CREATE UNIQUE INDEX withdrawals_one_open ON withdrawals (shop_id) WHERE status = 'requested';
CREATE UNIQUE INDEX withdrawals_idempotency ON withdrawals (shop_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX withdrawals_shop ON withdrawals (shop_id, created_at DESC);
CREATE INDEX withdrawals_status ON withdrawals (status, created_at);

-- A customer's request for money back on a line of a shipped or delivered
-- seller order: decided by the seller, or by an admin stepping in.
CREATE TABLE refund_requests (
    id              uuid PRIMARY KEY,
    order_id        uuid        NOT NULL REFERENCES orders (id),
    seller_order_id uuid        NOT NULL REFERENCES seller_orders (id),
    order_line_id   uuid        NOT NULL REFERENCES order_lines (id),
    shop_id         uuid        NOT NULL REFERENCES shops (id),
    customer_id     uuid        NOT NULL REFERENCES users (id),
    quantity        int         NOT NULL CHECK (quantity > 0),
    -- What those units were paid (line price less their share of the
    -- seller order's discount), fixed when asked.
    amount_minor    bigint      NOT NULL CHECK (amount_minor > 0),
    reason          text        NOT NULL,
    status          text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'approved', 'rejected')),
    restock         boolean,
    decided_by      uuid REFERENCES users (id),
    decided_role    text CHECK (decided_role IN ('seller', 'admin')),
    decision_reason text,
    refund_id       uuid REFERENCES refunds (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz
);
-- One open request per line at a time.
CREATE UNIQUE INDEX refund_requests_one_open ON refund_requests (order_line_id) WHERE status = 'open';
CREATE INDEX refund_requests_shop ON refund_requests (shop_id, created_at DESC);
CREATE INDEX refund_requests_customer ON refund_requests (customer_id, created_at DESC);

CREATE TABLE refund_request_images (
    id                uuid PRIMARY KEY,
    refund_request_id uuid        NOT NULL REFERENCES refund_requests (id),
    file              text        NOT NULL,
    position          int         NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refund_request_images_request ON refund_request_images (refund_request_id, position);
