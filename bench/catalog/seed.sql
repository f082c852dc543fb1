-- The catalog workloads' data (../shared/BENCHMARKS.md): 1000 products, one
-- variant each, across 10 shops; product n in shop ((n-1) mod 10)+1, title
-- "Product 0001".., SKU "SKU-0001".., price 500 + (n*7919) mod 9501 cents,
-- stock 1,000,000. Descriptions cycle through a few words so a one-word
-- search matches a fifth of the catalog.
BEGIN;
INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
SELECT gen_random_uuid(), format('seller-%s@bench.souk', lpad(s::text, 2, '0')), NULL,
       format('Seller %s', s), 'seller', now()
  FROM generate_series(1, 10) s;
INSERT INTO shops (id, owner_id, name, slug, contact_email)
SELECT gen_random_uuid(), u.id, format('Shop %s', lpad(s::text, 2, '0')),
       format('shop-%s', lpad(s::text, 2, '0')), u.email
  FROM generate_series(1, 10) s
  JOIN users u ON u.email = format('seller-%s@bench.souk', lpad(s::text, 2, '0'));
INSERT INTO products (id, shop_id, title, description, tags, status, published_at)
SELECT gen_random_uuid(), sh.id, format('Product %s', lpad(n::text, 4, '0')),
       format('A handmade %s piece, number %s.',
              (ARRAY['walnut', 'ceramic', 'linen', 'brass', 'wool'])[1 + n % 5], n),
       ARRAY[(ARRAY['kitchen', 'home', 'garden', 'bath', 'office'])[1 + n % 5]],
       'active', now() - make_interval(secs => 1000 - n)
  FROM generate_series(1, 1000) n
  JOIN shops sh ON sh.slug = format('shop-%s', lpad((((n - 1) % 10) + 1)::text, 2, '0'));
INSERT INTO variants (id, product_id, shop_id, sku, title, price_minor, on_hand)
SELECT gen_random_uuid(), p.id, p.shop_id, format('SKU-%s', right(p.title, 4)), 'Default',
       500 + (right(p.title, 4)::int * 7919) % 9501, 1000000
  FROM products p;
COMMIT;
ANALYZE;
