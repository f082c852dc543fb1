-- Catalog: categories, products with variants, stock and its history,
-- time-boxed sale prices, in-app notifications, and the cart.

-- A tree: a category with no parent is a root.
CREATE TABLE categories (
    id         uuid PRIMARY KEY,
    parent_id  uuid REFERENCES categories (id),
    name       text        NOT NULL,
    slug       text        NOT NULL CHECK (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$'),
    position   int         NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX categories_slug_key ON categories (slug);

-- array_to_string is only STABLE; tags are plain text, so this is safe to
-- call IMMUTABLE, which a generated column needs.
CREATE FUNCTION souk_words(text[]) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT array_to_string($1, ' ') $$;

CREATE TABLE products (
    id            uuid PRIMARY KEY,
    shop_id       uuid        NOT NULL REFERENCES shops (id),
    title         text        NOT NULL,
    description   text        NOT NULL DEFAULT '',
    category_id   uuid REFERENCES categories (id),
    tags          text[]      NOT NULL DEFAULT '{}',
    status        text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'active', 'archived')),
    -- Moderation: a hidden product is invisible to the storefront; the
    -- seller sees the reason.
    hidden_at     timestamptz,
    hidden_reason text,
    -- Kept current by reviews (sum of stars and their count).
    rating_sum    bigint      NOT NULL DEFAULT 0,
    rating_count  bigint      NOT NULL DEFAULT 0,
    -- Units sold, kept current by payments; for "best-selling".
    sold_count    bigint      NOT NULL DEFAULT 0,
    published_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Ranked full-text search: title weighs most, then tags, then description.
    search        tsvector GENERATED ALWAYS AS (
                      setweight(to_tsvector('english', title), 'A') ||
                      setweight(to_tsvector('english', souk_words(tags)), 'B') ||
                      setweight(to_tsvector('english', description), 'C')) STORED
);
CREATE INDEX products_search ON products USING gin (search);
CREATE INDEX products_shop ON products (shop_id, created_at DESC);
CREATE INDEX products_category ON products (category_id);
CREATE INDEX products_listed ON products (published_at DESC) WHERE status = 'active' AND hidden_at IS NULL;

-- Product photos, stored as re-encoded PNGs under
-- products/<product>/<file> in the object store; shown in `position` order.
CREATE TABLE product_images (
    id         uuid PRIMARY KEY,
    product_id uuid        NOT NULL REFERENCES products (id),
    file       text        NOT NULL,
    position   int         NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX product_images_product ON product_images (product_id, position);

CREATE TABLE variants (
    id                  uuid PRIMARY KEY,
    product_id          uuid        NOT NULL REFERENCES products (id),
    -- The product's shop, repeated so a SKU is unique within a shop.
    shop_id             uuid        NOT NULL REFERENCES shops (id),
    sku                 text        NOT NULL,
    title               text        NOT NULL,
    price_minor         bigint      NOT NULL CHECK (price_minor >= 0),
    compare_at_minor    bigint      CHECK (compare_at_minor >= 0),
    on_hand             int         NOT NULL DEFAULT 0,
    reserved            int         NOT NULL DEFAULT 0,
    -- Notify the seller when available stock falls below this (0: never).
    low_stock_threshold int         NOT NULL DEFAULT 0 CHECK (low_stock_threshold >= 0),
    -- Set when the seller was told; cleared when stock is back at or above
    -- the threshold, so each fall below it notifies once.
    low_stock_alerted   boolean     NOT NULL DEFAULT false,
    position            int         NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT variants_stock CHECK (on_hand >= reserved AND reserved >= 0)
);
CREATE UNIQUE INDEX variants_sku_key ON variants (shop_id, sku);
CREATE INDEX variants_product ON variants (product_id, position);

-- Every change of on_hand, with who and why. Append-only.
CREATE TABLE stock_adjustments (
    id            uuid PRIMARY KEY,
    variant_id    uuid        NOT NULL REFERENCES variants (id),
    actor_id      uuid REFERENCES users (id),
    delta         int         NOT NULL CHECK (delta <> 0),
    reason        text        NOT NULL,
    on_hand_after int         NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_adjustments_variant ON stock_adjustments (variant_id, created_at DESC);

-- A time-boxed sale price for a variant, set by its seller.
CREATE TABLE sale_prices (
    id          uuid PRIMARY KEY,
    variant_id  uuid        NOT NULL REFERENCES variants (id),
    price_minor bigint      NOT NULL CHECK (price_minor >= 0),
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX sale_prices_variant ON sale_prices (variant_id, ends_at);

-- The one definition of "the price in force now" and "available", used by
-- the catalog and the cart alike.
CREATE VIEW variants_now AS
SELECT v.*,
       coalesce(s.price_minor, v.price_minor) AS price_now_minor,
       s.ends_at                              AS sale_ends_at,
       v.on_hand - v.reserved                 AS available
  FROM variants v
  LEFT JOIN LATERAL (
        SELECT sp.price_minor, sp.ends_at
          FROM sale_prices sp
         WHERE sp.variant_id = v.id AND sp.starts_at <= now() AND now() < sp.ends_at
         ORDER BY sp.price_minor, sp.ends_at
         LIMIT 1) s ON true;

-- In-app notifications (low stock, new orders, ...).
CREATE TABLE notifications (
    id         uuid PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id),
    kind       text        NOT NULL,
    data       jsonb       NOT NULL DEFAULT '{}',
    read_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifications_user ON notifications (user_id, created_at DESC);

-- One persistent cart per customer: a line per variant.
CREATE TABLE cart_items (
    user_id    uuid        NOT NULL REFERENCES users (id),
    variant_id uuid        NOT NULL REFERENCES variants (id),
    quantity   int         NOT NULL CHECK (quantity BETWEEN 1 AND 999),
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, variant_id)
);
