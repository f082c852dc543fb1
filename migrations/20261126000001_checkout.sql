-- Checkout to delivery: orders with money and an address snapshot, seller
-- orders with their share of it, the order's event trail, Stripe webhook
-- events, payments and refunds. The state machines are written down in
-- docs/orders.md and enforced in shared/src/orders/status.rs.

-- Per-shop terms: a flat shipping rate per seller order (set by the
-- seller) and a commission rate (set by admins). NULL: the platform's
-- defaults (SHIPPING_FLAT_MINOR, COMMISSION_BPS of the order-splitter).
ALTER TABLE shops
    ADD COLUMN shipping_flat_minor bigint CHECK (shipping_flat_minor >= 0),
    ADD COLUMN commission_bps      int    CHECK (commission_bps BETWEEN 0 AND 10000);

ALTER TABLE orders
    ADD COLUMN currency          text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    -- Lines at their snapshot prices.
    ADD COLUMN subtotal_minor    bigint NOT NULL CHECK (subtotal_minor >= 0),
    ADD COLUMN discount_minor    bigint NOT NULL DEFAULT 0 CHECK (discount_minor >= 0),
    -- Known once the order is split (NULL while pending).
    ADD COLUMN shipping_minor    bigint CHECK (shipping_minor >= 0),
    ADD COLUMN total_minor       bigint CHECK (total_minor >= 0),
    ADD COLUMN refunded_minor    bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    ADD COLUMN coupon_id         uuid REFERENCES coupons (id),
    ADD COLUMN coupon_code       text,
    -- The shipping address as it was at checkout.
    ADD COLUMN shipping_address  jsonb  NOT NULL,
    -- Checkout's Idempotency-Key and a digest of the request it came with.
    ADD COLUMN idempotency_key   text,
    ADD COLUMN request_hash      bytea,
    -- Where the order's stock is: none yet, held for it, taken by the sale,
    -- or given back. Moves only forward, each step one conditional UPDATE.
    ADD COLUMN stock             text   NOT NULL DEFAULT 'none'
                                 CHECK (stock IN ('none', 'reserved', 'committed', 'released')),
    ADD COLUMN reserved_until    timestamptz,
    ADD COLUMN split_at          timestamptz,
    -- The one PaymentIntent of the order and its client secret (shown to the
    -- order's owner only).
    ADD COLUMN payment_intent_id text UNIQUE,
    ADD COLUMN client_secret     text,
    ADD COLUMN paid_at           timestamptz,
    -- Why it failed, expired or was cancelled, in words for the customer.
    ADD COLUMN failure_reason    text,
    ADD COLUMN correlation_id    text   NOT NULL DEFAULT '',
    ADD CONSTRAINT orders_total CHECK (total_minor IS NULL OR total_minor = subtotal_minor - discount_minor + shipping_minor),
    ADD CONSTRAINT orders_refund_limit CHECK (refunded_minor <= coalesce(total_minor, 0));
CREATE UNIQUE INDEX orders_idempotency ON orders (customer_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX orders_status ON orders (status, created_at DESC);
-- The expiry sweep looks only at orders still holding stock unpaid.
CREATE INDEX orders_reservation_expiry ON orders (reserved_until)
    WHERE stock = 'reserved' AND status IN ('reserved', 'awaiting_payment', 'payment_failed');

ALTER TABLE seller_orders
    -- The seller's lines at snapshot prices, its share of a coupon, its
    -- flat shipping; total = items - discount + shipping (what the customer
    -- pays for this part).
    ADD COLUMN items_minor      bigint NOT NULL CHECK (items_minor >= 0),
    ADD COLUMN discount_minor   bigint NOT NULL CHECK (discount_minor >= 0),
    ADD COLUMN shipping_minor   bigint NOT NULL CHECK (shipping_minor >= 0),
    ADD COLUMN total_minor      bigint NOT NULL CHECK (total_minor >= 0),
    -- The platform's commission on items - discount, and what the seller keeps.
    ADD COLUMN commission_bps   int    NOT NULL CHECK (commission_bps BETWEEN 0 AND 10000),
    ADD COLUMN commission_minor bigint NOT NULL CHECK (commission_minor >= 0),
    ADD COLUMN payout_minor     bigint NOT NULL,
    ADD COLUMN refunded_minor   bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    ADD COLUMN carrier          text,
    ADD COLUMN tracking_number  text,
    ADD COLUMN shipped_at       timestamptz,
    -- Set when this part's sold units went back on the shelf (a cancel).
    ADD COLUMN stock_returned_at timestamptz,
    ADD CONSTRAINT seller_orders_total CHECK (total_minor = items_minor - discount_minor + shipping_minor),
    ADD CONSTRAINT seller_orders_payout CHECK (payout_minor = total_minor - commission_minor),
    ADD CONSTRAINT seller_orders_refund_limit CHECK (refunded_minor <= total_minor);
CREATE INDEX seller_orders_shop ON seller_orders (shop_id, created_at DESC);

-- Every change of an order or one of its seller orders, appended, never
-- updated: the customer's tracking timeline and the admins' history.
CREATE TABLE order_events (
    id              uuid PRIMARY KEY,
    order_id        uuid        NOT NULL REFERENCES orders (id),
    seller_order_id uuid REFERENCES seller_orders (id),
    -- `order` or `seller_order`: which status changed.
    subject         text        NOT NULL CHECK (subject IN ('order', 'seller_order')),
    from_status     text,
    to_status       text        NOT NULL,
    -- Who: a user, or NULL for the system (workers, Stripe).
    actor_id        uuid REFERENCES users (id),
    actor_role      text        NOT NULL CHECK (actor_role IN ('customer', 'seller', 'admin', 'system')),
    note            text,
    data            jsonb       NOT NULL DEFAULT '{}',
    -- clock_timestamp(): several events of one transaction keep their order.
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_events_order ON order_events (order_id, created_at);

-- Stripe webhook events, stored once by their id (a repeat changes nothing).
CREATE TABLE stripe_events (
    id          text PRIMARY KEY,
    type        text        NOT NULL,
    payload     jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Every successful charge of an order. At most one counts (duplicate =
-- false); any other that ever succeeds is refunded and flagged for admins.
CREATE TABLE payments (
    id                uuid PRIMARY KEY,
    order_id          uuid        NOT NULL REFERENCES orders (id),
    payment_intent_id text        NOT NULL UNIQUE,
    amount_minor      bigint      NOT NULL CHECK (amount_minor > 0),
    currency          text        NOT NULL,
    duplicate         boolean     NOT NULL DEFAULT false,
    flagged_reason    text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX payments_one_per_order ON payments (order_id) WHERE NOT duplicate;
CREATE INDEX payments_flagged ON payments (created_at DESC) WHERE flagged_reason IS NOT NULL;

-- Money sent back through Stripe. Decided (and the amount checked against
-- what is left) in the transaction that holds the order's row; the payments
-- worker then makes the Stripe call with the refund's id as idempotency key.
CREATE TABLE refunds (
    id               uuid PRIMARY KEY,
    order_id         uuid        NOT NULL REFERENCES orders (id),
    payment_id       uuid        NOT NULL REFERENCES payments (id),
    seller_order_id  uuid REFERENCES seller_orders (id),
    amount_minor     bigint      NOT NULL CHECK (amount_minor > 0),
    reason           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'requested' CHECK (status IN ('requested', 'succeeded', 'failed')),
    stripe_refund_id text UNIQUE,
    failure          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
);
CREATE INDEX refunds_order ON refunds (order_id);
