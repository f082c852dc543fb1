//! What the storefront may sell, as SQL both the API and the workers use.

/// A product the storefront may show and sell: active, not hidden, its
/// seller and shop in good standing. Over `products p`, `shops s` and the
/// shop owner `users u`.
pub const VISIBLE: &str = "p.status = 'active' AND p.hidden_at IS NULL AND u.suspended_at IS NULL \
     AND s.approved_at IS NOT NULL AND s.suspended_at IS NULL";
