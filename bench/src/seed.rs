//! The benchmark data set of `../shared/BENCHMARKS.md`, loaded into a
//! migrated database, idempotently: ids are derived from the product number,
//! so running it again (or with a larger `--products`) only adds what is
//! missing, never a duplicate.
//!
//! Product n (1..N) belongs to shop `shop-((n-1) mod 10 + 1)`, is titled
//! `Product 0001`.., SKU `SKU-0001`.., one variant priced
//! `500 + (n × 7919) mod 9501` cents with 1,000,000 in stock. Descriptions
//! cycle through five words (`walnut`, `ceramic`, `linen`, `brass`, `wool`),
//! so a one-word search matches a fifth of the catalog.

use sqlx::PgPool;

/// `n` as the data set numbers things: at least four digits.
const NUMBER: &str = "CASE WHEN n < 10000 THEN lpad(n::text, 4, '0') ELSE n::text END";

pub async fn run(database: &str, products: u32) -> anyhow::Result<()> {
    let pool = souk_shared::db::pool(database, 2)?;
    souk_shared::db::migrate(&pool).await?;
    seed(&pool, products).await?;
    let (shops, count): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM shops WHERE slug LIKE 'shop-__'),
                (SELECT count(*) FROM variants WHERE sku LIKE 'SKU-%')",
    )
    .fetch_one(&pool)
    .await?;
    eprintln!("seeded: {shops} shops, {count} products (one variant each)");
    Ok(())
}

pub async fn seed(pool: &PgPool, products: u32) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, name, role, email_verified_at)
         SELECT md5('souk-bench-seller-' || s)::uuid, format('seller-%s@bench.souk', lpad(s::text, 2, '0')),
                NULL, format('Seller %s', s), 'seller', now()
           FROM generate_series(1, 10) s
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO shops (id, owner_id, name, slug, contact_email, approved_at)
         SELECT md5('souk-bench-shop-' || s)::uuid, md5('souk-bench-seller-' || s)::uuid,
                format('Shop %s', lpad(s::text, 2, '0')), format('shop-%s', lpad(s::text, 2, '0')),
                format('seller-%s@bench.souk', lpad(s::text, 2, '0')), now()
           FROM generate_series(1, 10) s
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO products (id, shop_id, title, description, tags, status, published_at)
         SELECT md5('souk-bench-product-' || n)::uuid,
                md5('souk-bench-shop-' || ((n - 1) % 10 + 1))::uuid,
                'Product ' || {NUMBER},
                format('A handmade %s piece, number %s.',
                       (ARRAY['walnut', 'ceramic', 'linen', 'brass', 'wool'])[1 + n % 5], n),
                ARRAY[(ARRAY['kitchen', 'home', 'garden', 'bath', 'office'])[1 + n % 5]],
                'active', now() - make_interval(secs => $1 - n)
           FROM generate_series(1, $1) n
         ON CONFLICT DO NOTHING"
    )))
    .bind(i32::try_from(products)?)
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO variants (id, product_id, shop_id, sku, title, price_minor, on_hand)
         SELECT md5('souk-bench-variant-' || n)::uuid, md5('souk-bench-product-' || n)::uuid,
                md5('souk-bench-shop-' || ((n - 1) % 10 + 1))::uuid,
                'SKU-' || {NUMBER}, 'Default', 500 + (n * 7919) % 9501, 1000000
           FROM generate_series(1, $1) n
         ON CONFLICT DO NOTHING"
    )))
    .bind(i32::try_from(products)?)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // As autovacuum would soon after a bulk load: plans made for empty
    // tables would scan, and index-only scans need the visibility map (the
    // rows the first variants marked are rewritten).
    sqlx::query("VACUUM (ANALYZE)").execute(pool).await?;
    Ok(())
}
