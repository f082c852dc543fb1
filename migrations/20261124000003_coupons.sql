-- Coupons: a shop's (applies to that shop's items) or the platform's (the
-- whole cart, shop_id NULL); percent or fixed amount off.
CREATE TABLE coupons (
    id                    uuid PRIMARY KEY,
    code                  text        NOT NULL CHECK (code ~ '^[A-Za-z0-9_-]{3,32}$'),
    shop_id               uuid REFERENCES shops (id),
    percent_off           int         CHECK (percent_off BETWEEN 1 AND 100),
    amount_off_minor      bigint      CHECK (amount_off_minor > 0),
    min_order_minor       bigint      NOT NULL DEFAULT 0 CHECK (min_order_minor >= 0),
    starts_at             timestamptz,
    ends_at               timestamptz,
    max_uses              int         CHECK (max_uses > 0),
    max_uses_per_customer int         CHECK (max_uses_per_customer > 0),
    -- Counted once per paid order (see coupon_redemptions).
    uses                  int         NOT NULL DEFAULT 0,
    created_by            uuid        NOT NULL REFERENCES users (id),
    disabled_at           timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((percent_off IS NULL) <> (amount_off_minor IS NULL)),
    CHECK (ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at),
    CHECK (max_uses IS NULL OR uses <= max_uses)
);
-- Codes are unique regardless of case, across shops and the platform.
CREATE UNIQUE INDEX coupons_code_key ON coupons (lower(code));

-- One use per paid order: the primary key makes counting it idempotent.
CREATE TABLE coupon_redemptions (
    coupon_id  uuid        NOT NULL REFERENCES coupons (id),
    order_id   uuid        NOT NULL,
    user_id    uuid        NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (coupon_id, order_id)
);
CREATE INDEX coupon_redemptions_user ON coupon_redemptions (coupon_id, user_id);

-- The coupon a cart carries (one per cart).
CREATE TABLE cart_coupons (
    user_id   uuid        PRIMARY KEY REFERENCES users (id),
    coupon_id uuid        NOT NULL REFERENCES coupons (id),
    added_at  timestamptz NOT NULL DEFAULT now()
);
