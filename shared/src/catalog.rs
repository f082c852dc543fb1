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

/// A product the storefront may show and sell: listed, in an open shop.
/// Over `products p`, `shops s` and the shop owner `users u`.
pub const VISIBLE: &str = concat!(listed!(), " AND ", open_shop!());
