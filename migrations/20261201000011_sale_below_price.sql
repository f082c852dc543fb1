-- A sale is a reduction: it applies only while it is below the variant's
-- regular price. A sale set at 800 against 1000, then the regular price
-- cut to 500, must not charge 800 while it runs (the check when the sale
-- was made cannot see a later price change, so the view decides at read).
CREATE OR REPLACE VIEW variants_now AS
SELECT v.*,
       coalesce(s.price_minor, v.price_minor) AS price_now_minor,
       s.ends_at                              AS sale_ends_at,
       v.on_hand - v.reserved                 AS available
  FROM variants v
  LEFT JOIN LATERAL (
        SELECT sp.price_minor, sp.ends_at
          FROM sale_prices sp
         WHERE sp.variant_id = v.id AND sp.starts_at <= now() AND now() < sp.ends_at
           AND sp.price_minor < v.price_minor
         ORDER BY sp.price_minor, sp.ends_at
         LIMIT 1) s ON true;
