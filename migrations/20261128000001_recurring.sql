-- Recurring commerce: saved cards, membership plans and memberships
-- (Stripe subscriptions), and scheduled replenishment orders.

-- Each account's customer at Stripe, made the first time it saves a card.
CREATE TABLE stripe_customers (
    user_id            uuid PRIMARY KEY REFERENCES users (id),
    stripe_customer_id text        NOT NULL UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- A card saved for off-session charges (replenishment orders,
-- subscriptions), through a SetupIntent the storefront confirms.
CREATE TABLE payment_methods (
    id                       uuid PRIMARY KEY,
    user_id                  uuid        NOT NULL REFERENCES users (id),
    status                   text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'active', 'failed', 'removed')),
    setup_intent_id          text UNIQUE,
    client_secret            text,
    stripe_payment_method_id text UNIQUE,
    brand                    text,
    last4                    text,
    exp_month                int,
    exp_year                 int,
    failure                  text,
    created_at               timestamptz NOT NULL DEFAULT now(),
    activated_at             timestamptz
);
CREATE INDEX payment_methods_user ON payment_methods (user_id, created_at DESC);

-- Membership plans: a Stripe plan (price) each, and what a member gets.
CREATE TABLE membership_plans (
    id             uuid PRIMARY KEY,
    name           text        NOT NULL,
    amount_minor   bigint      NOT NULL CHECK (amount_minor > 0),
    currency       text        NOT NULL,
    interval       text        NOT NULL CHECK (interval IN ('month', 'year')),
    free_shipping  boolean     NOT NULL DEFAULT false,
    percent_off    int         NOT NULL DEFAULT 0 CHECK (percent_off BETWEEN 0 AND 100),
    -- pending until the plan exists at Stripe.
    status         text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'active', 'retired')),
    stripe_plan_id text UNIQUE,
    created_by     uuid        NOT NULL REFERENCES users (id),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- A customer's membership: its status follows the Stripe subscription's
-- webhooks through the state machine in shared/src/membership.rs.
CREATE TABLE memberships (
    id                     uuid PRIMARY KEY,
    user_id                uuid        NOT NULL REFERENCES users (id),
    plan_id                uuid        NOT NULL REFERENCES membership_plans (id),
    payment_method_id      uuid        NOT NULL REFERENCES payment_methods (id),
    status                 text        NOT NULL DEFAULT 'requested'
                           CHECK (status IN ('requested', 'incomplete', 'active', 'past_due', 'canceled', 'failed')),
    stripe_subscription_id text UNIQUE,
    cancel_at_period_end   boolean     NOT NULL DEFAULT false,
    -- The member asked to cancel; Stripe's answer sets cancel_at_period_end.
    cancel_requested_at    timestamptz,
    current_period_end     timestamptz,
    -- When Stripe made the change last applied: older news is ignored.
    status_at              timestamptz,
    failure                text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
-- At most one membership that is not over, per account.
CREATE UNIQUE INDEX memberships_one_live ON memberships (user_id)
    WHERE status IN ('requested', 'incomplete', 'active', 'past_due');

-- A customer's recurring order: chosen variants, every `interval_days` or on
-- a cron expression (UTC), to an address, paid off session with a saved card.
CREATE TABLE replenishment_schedules (
    id                          uuid PRIMARY KEY,
    customer_id                 uuid        NOT NULL REFERENCES users (id),
    -- Deleting the address leaves the schedule without one: its runs fail
    -- (and the customer is told) until another is chosen.
    address_id                  uuid REFERENCES addresses (id) ON DELETE SET NULL,
    payment_method_id           uuid        NOT NULL REFERENCES payment_methods (id),
    -- The market's currency when it was made: its orders are in it.
    currency                    text        NOT NULL,
    -- [{variant_id, quantity, reference_price_minor}]: the price each was
    -- when scheduled, against which `price_increase_limit_percent` is checked.
    items                       jsonb       NOT NULL,
    interval_days               int CHECK (interval_days BETWEEN 1 AND 365),
    cron                        text,
    -- A run that fails (out of stock, price beyond the limit, card declined)
    -- is retried later (`retry`, up to REPLENISH_MAX_ATTEMPTS) or skipped.
    on_failure                  text        NOT NULL DEFAULT 'skip' CHECK (on_failure IN ('retry', 'skip')),
    price_increase_limit_percent int        NOT NULL DEFAULT 10 CHECK (price_increase_limit_percent BETWEEN 0 AND 1000),
    status                      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'cancelled')),
    next_run_at                 timestamptz NOT NULL,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK ((interval_days IS NULL) <> (cron IS NULL))
);
CREATE INDEX replenishment_schedules_due ON replenishment_schedules (next_run_at) WHERE status = 'active';
CREATE INDEX replenishment_schedules_customer ON replenishment_schedules (customer_id, created_at DESC);

-- One run per schedule and due time: the unique key that makes overlapping
-- replenishers and restarts harmless.
CREATE TABLE replenishment_runs (
    id          uuid PRIMARY KEY,
    schedule_id uuid        NOT NULL REFERENCES replenishment_schedules (id),
    due_at      timestamptz NOT NULL,
    attempt     int         NOT NULL DEFAULT 1,
    status      text        NOT NULL CHECK (status IN (
                    'placed', 'skipped', 'retrying', 'failed')),
    -- Why it did not place an order that was paid (shared/src/replenishment.rs):
    -- out_of_stock, unavailable, price_changed, payment_declined, unpaid,
    -- no_address, no_card, skipped_by_customer.
    reason      text,
    detail      text,
    order_id    uuid REFERENCES orders (id),
    retry_at    timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (schedule_id, due_at)
);
CREATE INDEX replenishment_runs_retry ON replenishment_runs (retry_at) WHERE status = 'retrying';

-- Membership benefits and how the order is paid.
ALTER TABLE orders
    ADD COLUMN membership_id             uuid REFERENCES memberships (id),
    -- Part of discount_minor: the membership's percentage off.
    ADD COLUMN membership_discount_minor bigint  NOT NULL DEFAULT 0 CHECK (membership_discount_minor >= 0),
    ADD COLUMN free_shipping             boolean NOT NULL DEFAULT false,
    -- A saved card charged off session (replenishment orders).
    ADD COLUMN payment_method_id         uuid REFERENCES payment_methods (id),
    ADD COLUMN replenishment_run_id      uuid REFERENCES replenishment_runs (id),
    ADD CONSTRAINT orders_membership_discount CHECK (membership_discount_minor <= discount_minor);
-- A run has at most one order that is not over (a retry after a declined
-- card comes after the first order was cancelled).
CREATE UNIQUE INDEX orders_one_live_per_run ON orders (replenishment_run_id)
    WHERE replenishment_run_id IS NOT NULL
      AND status NOT IN ('out_of_stock', 'expired', 'cancelled', 'refunded');
-- The replenisher's follow-up: runs whose order ended unpaid.
CREATE INDEX orders_replenishment_unpaid ON orders (replenishment_run_id)
    WHERE replenishment_run_id IS NOT NULL AND status IN ('out_of_stock', 'payment_failed', 'expired');
