//! What the storefront may sell, as SQL both the API and the workers use.

macro_rules! listed {
    () => {
        "p.status = 'active' AND p.hidden_at IS NULL"
    };
}
macro_rules! open_shop {
    () => {
        "u.suspended_at IS NULL AND s.approved_at IS NOT NULL AND s.suspended_at IS NULL"
    };
}

/// A product its seller lists and moderation has not hidden. Over
/// `products p`.
pub const LISTED: &str = listed!();

/// A shop in good standing: approved, not suspended, its owner not
/// suspended. Over `shops s` and the shop owner `users u`.
pub const OPEN_SHOP: &str = open_shop!();

macro_rules! visible_product {
    ($id:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM products p JOIN shops s ON s.id = p.shop_id
                       JOIN users u ON u.id = s.owner_id
                      WHERE p.id = ",
            $id,
            " AND ",
            listed!(),
            " AND ",
            open_shop!(),
            ")"
        )
    };
}

/// [`VISIBLE`] as one condition over a product row aliased `o` (an image
/// gallery's owner): its shop and the shop's owner looked up inside.
pub const VISIBLE_O: &str = visible_product!("o.id");

/// [`VISIBLE`] for the product a row aliased `o` names in `product_id` (a
/// review), as one condition.
pub const VISIBLE_PRODUCT_OF_O: &str = visible_product!("o.product_id");

/// A product the storefront may show and sell: listed, in an open shop.
/// Over `products p`, `shops s` and the shop owner `users u`.
pub const VISIBLE: &str = concat!(listed!(), " AND ", open_shop!());
