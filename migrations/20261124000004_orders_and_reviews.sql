-- Orders as far as reviews need them: who bought which product from which
-- shop, and whether that shop's part was delivered. The Checkout issue
-- fills these tables (and extends them with money and addresses).

CREATE TABLE orders (
    id          uuid PRIMARY KEY,
    customer_id uuid        NOT NULL REFERENCES users (id),
    status      text        NOT NULL CHECK (status IN ('pending', 'reserved', 'awaiting_payment',
                    'paid', 'payment_failed', 'out_of_stock', 'expired', 'cancelled', 'refunded')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer ON orders (customer_id, created_at DESC);

-- One per shop in an order: what that seller fulfils.
CREATE TABLE seller_orders (
    id           uuid PRIMARY KEY,
    order_id     uuid        NOT NULL REFERENCES orders (id),
    shop_id      uuid        NOT NULL REFERENCES shops (id),
    status       text        NOT NULL CHECK (status IN ('pending', 'paid', 'processing', 'shipped',
                     'delivered', 'cancelled', 'refunded')),
    delivered_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, shop_id)
);

-- Immutable snapshots of what was bought.
CREATE TABLE order_lines (
    id               uuid PRIMARY KEY,
    order_id         uuid        NOT NULL REFERENCES orders (id),
    shop_id          uuid        NOT NULL REFERENCES shops (id),
    product_id       uuid        NOT NULL REFERENCES products (id),
    variant_id       uuid        NOT NULL REFERENCES variants (id),
    title            text        NOT NULL,
    variant_title    text        NOT NULL,
    sku              text        NOT NULL,
    unit_price_minor bigint      NOT NULL CHECK (unit_price_minor >= 0),
    quantity         int         NOT NULL CHECK (quantity > 0),
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_lines_order ON order_lines (order_id);
CREATE INDEX order_lines_product ON order_lines (product_id);

-- Reviews: by a customer with a delivered purchase of the product, once.
CREATE TABLE reviews (
    id             uuid PRIMARY KEY,
    product_id     uuid        NOT NULL REFERENCES products (id),
    shop_id        uuid        NOT NULL REFERENCES shops (id),
    author_id      uuid        NOT NULL REFERENCES users (id),
    rating         int         NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body           text        NOT NULL DEFAULT '',
    -- The seller's one reply.
    reply          text,
    replied_at     timestamptz,
    -- Removed by an admin: hidden and out of the averages, still counted
    -- as the author's one review.
    removed_at     timestamptz,
    removed_reason text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reviews_once UNIQUE (product_id, author_id)
);
CREATE INDEX reviews_product ON reviews (product_id, created_at DESC) WHERE removed_at IS NULL;

CREATE TABLE review_images (
    id         uuid PRIMARY KEY,
    review_id  uuid        NOT NULL REFERENCES reviews (id),
    file       text        NOT NULL,
    position   int         NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX review_images_review ON review_images (review_id, position);

-- Shop ratings, kept current with the product ones.
ALTER TABLE shops
    ADD COLUMN rating_sum   bigint NOT NULL DEFAULT 0,
    ADD COLUMN rating_count bigint NOT NULL DEFAULT 0;
