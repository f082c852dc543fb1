-- Demo catalog for `souk-admin demo-data`: categories, two shops' products
-- with stock, a running sale and coupons. Run once, after the accounts.
INSERT INTO categories (id, parent_id, name, slug, position) VALUES
    ('00000000-0000-7000-8000-00000000c001', NULL, 'Home', 'home', 0),
    ('00000000-0000-7000-8000-00000000c002', '00000000-0000-7000-8000-00000000c001', 'Kitchen', 'kitchen', 0),
    ('00000000-0000-7000-8000-00000000c003', '00000000-0000-7000-8000-00000000c001', 'Textiles', 'textiles', 1),
    ('00000000-0000-7000-8000-00000000c004', NULL, 'Pantry', 'pantry', 1);

WITH items (shop, title, description, category, tags, sku, variant, price, compare_at, stock, threshold) AS (
    VALUES
    ('olive-and-oak', 'Walnut cutting board', 'End-grain walnut, oiled by hand.', 'kitchen', ARRAY['wood', 'kitchen'], 'OAK-BOARD-L', 'Large', 6500, NULL::bigint, 12, 3),
    ('olive-and-oak', 'Walnut cutting board', 'End-grain walnut, oiled by hand.', 'kitchen', ARRAY['wood', 'kitchen'], 'OAK-BOARD-S', 'Small', 4200, NULL, 20, 3),
    ('olive-and-oak', 'Olive wood spoon set', 'Three spoons carved from one branch.', 'kitchen', ARRAY['wood'], 'OAK-SPOONS', 'Default', 2400, 2900, 40, 5),
    ('olive-and-oak', 'Linen tea towels', 'Stone-washed linen, set of two.', 'textiles', ARRAY['linen', 'kitchen'], 'OAK-TOWELS', 'Default', 1800, NULL, 3, 5),
    ('olive-and-oak', 'Wool throw', 'Undyed wool from a single flock.', 'textiles', ARRAY['wool'], 'OAK-THROW', 'Default', 12000, NULL, 0, 1),
    ('souk-pantry', 'Wildflower honey', 'Raw, unfiltered, 500 g.', 'pantry', ARRAY['honey'], 'PAN-HONEY', 'Default', 1100, NULL, 60, 10),
    ('souk-pantry', 'Za''atar blend', 'Thyme, sumac and sesame, 100 g.', 'pantry', ARRAY['spice'], 'PAN-ZAATAR', 'Default', 650, NULL, 80, 10),
    ('souk-pantry', 'Extra virgin olive oil', 'Cold-pressed, 750 ml.', 'pantry', ARRAY['oil'], 'PAN-OIL', 'Default', 1900, 2300, 25, 5)
),
products_made AS (
    INSERT INTO products (id, shop_id, title, description, category_id, tags, status, published_at)
    SELECT DISTINCT ON (i.shop, i.title) gen_random_uuid(), s.id, i.title, i.description, c.id, i.tags, 'active', now()
      FROM items i JOIN shops s ON s.slug = i.shop JOIN categories c ON c.slug = i.category
    RETURNING id, shop_id, title
)
INSERT INTO variants (id, product_id, shop_id, sku, title, price_minor, compare_at_minor, on_hand, low_stock_threshold, position)
SELECT gen_random_uuid(), p.id, p.shop_id, i.sku, i.variant, i.price, i.compare_at, i.stock, i.threshold,
       row_number() OVER (PARTITION BY p.id ORDER BY i.sku)
  FROM items i JOIN shops s ON s.slug = i.shop JOIN products_made p ON p.shop_id = s.id AND p.title = i.title;

INSERT INTO stock_adjustments (id, variant_id, actor_id, delta, reason, on_hand_after)
SELECT gen_random_uuid(), v.id, NULL, v.on_hand, 'demo data', v.on_hand FROM variants v WHERE v.on_hand > 0;

-- The honey is on sale this week.
INSERT INTO sale_prices (id, variant_id, price_minor, starts_at, ends_at)
SELECT gen_random_uuid(), id, 900, now() - interval '1 day', now() + interval '6 days'
  FROM variants WHERE sku = 'PAN-HONEY';

INSERT INTO coupons (id, code, shop_id, percent_off, amount_off_minor, min_order_minor, created_by)
SELECT gen_random_uuid(), 'OAK10', s.id, 10, NULL, 3000, s.owner_id FROM shops s WHERE s.slug = 'olive-and-oak'
UNION ALL
SELECT gen_random_uuid(), 'WELCOME5', NULL, NULL, 500, 2000, u.id FROM users u WHERE u.email = 'admin@demo.souk';

-- The customer's default shipping address.
INSERT INTO addresses (id, user_id, full_name, line1, city, postal_code, country, is_default)
SELECT gen_random_uuid(), id, 'Sam Customer', '12 Rue des Artisans', 'Lyon', '69002', 'FR', true
  FROM users WHERE email = 'customer@demo.souk';
