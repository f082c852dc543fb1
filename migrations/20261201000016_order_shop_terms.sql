-- A placed order's terms are fixed when it is placed: each shop's flat
-- shipping rate and commission rate, as they were at checkout (or when a
-- replenishment placed it), are kept here, and the order-splitter prices the
-- seller orders from them, so a seller changing its shipping, or an admin its
-- commission, after the order was placed changes only later orders.
--
-- NULL is what the shop's own column holds when it has no rate of its own:
-- the platform's default (SHIPPING_FLAT_MINOR, COMMISSION_BPS) applies.
CREATE TABLE order_shop_terms (
    order_id            uuid   NOT NULL REFERENCES orders (id),
    shop_id             uuid   NOT NULL REFERENCES shops (id),
    shipping_flat_minor bigint CHECK (shipping_flat_minor >= 0),
    commission_bps      int    CHECK (commission_bps BETWEEN 0 AND 10000),
    PRIMARY KEY (order_id, shop_id)
);

-- Immutable like the order's lines.
CREATE TRIGGER order_shop_terms_immutable BEFORE UPDATE OR DELETE ON order_shop_terms
    FOR EACH ROW EXECUTE FUNCTION souk_immutable();
CREATE TRIGGER order_shop_terms_no_truncate BEFORE TRUNCATE ON order_shop_terms
    FOR EACH STATEMENT EXECUTE FUNCTION souk_immutable();

-- Orders placed before this and not yet split: the terms as they are now,
-- the nearest there is to their checkout's.
INSERT INTO order_shop_terms (order_id, shop_id, shipping_flat_minor, commission_bps)
SELECT DISTINCT l.order_id, l.shop_id, s.shipping_flat_minor, s.commission_bps
  FROM order_lines l
  JOIN orders o ON o.id = l.order_id
  JOIN shops s ON s.id = l.shop_id
 WHERE o.split_at IS NULL;
