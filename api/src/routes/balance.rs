//! A seller's money: the balance (pending, available, withdrawing) and the
//! ledger entries behind it, from the shop's own ledger accounts only.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use souk_shared::ledger::{self, SellerBalance};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::Seller,
    error::{ApiError, FieldError, Problem},
    extract::{ValidQuery, Validate},
    routes::catalog::{Page, Paging},
    state::AppState,
};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    pub currency: String,
    /// Earned on delivered orders, inside the hold period.
    pub pending_minor: i64,
    /// May be withdrawn; negative after refunds larger than what was left
    /// (later earnings make up for it).
    pub available_minor: i64,
    /// Asked for in a withdrawal not paid yet.
    pub withdrawing_minor: i64,
}

/// The shop's balance, from its ledger entries.
#[utoipa::path(
    get, path = "/seller/balance", tag = "seller", security(("bearer" = [])),
    responses(
        (status = 200, description = "the balance", body = Balance),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn balance(
    State(state): State<AppState>,
    seller: Seller,
) -> Result<Json<Balance>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let currency = state.market.currency.clone();
    let SellerBalance {
        pending_minor,
        available_minor,
        withdrawing_minor,
    } = ledger::seller_balance(&mut conn, seller.shop_id, &currency).await?;
    Ok(Json(Balance {
        currency,
        pending_minor,
        available_minor,
        withdrawing_minor,
    }))
}

/// One movement of the shop's money.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct LedgerLine {
    pub at: DateTime<Utc>,
    pub transaction_id: Uuid,
    /// `earning`, `release`, `refund`, `withdrawal_hold`, `withdrawal_paid`
    /// or `withdrawal_returned`.
    pub kind: String,
    pub description: String,
    /// Which of the shop's balances moved: `seller_pending`,
    /// `seller_available` or `seller_withdrawing`.
    pub account: String,
    /// Positive in, negative out.
    pub amount_minor: i64,
    pub order_id: Option<Uuid>,
    pub seller_order_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerQuery {
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for LedgerQuery {
    fn validate(&self) -> Vec<FieldError> {
        Paging::check(self.page, self.per_page)
    }
}

/// The shop's ledger entries, newest first.
#[utoipa::path(
    get, path = "/seller/ledger", tag = "seller", security(("bearer" = [])), params(LedgerQuery),
    responses(
        (status = 200, description = "a page of entries", body = Page<LedgerLine>),
        (status = 403, description = "not a seller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn entries(
    State(state): State<AppState>,
    seller: Seller,
    ValidQuery(query): ValidQuery<LedgerQuery>,
) -> Result<Json<Page<LedgerLine>>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let items: Vec<LedgerLine> = sqlx::query_as(
        "SELECT e.created_at AS at, t.id AS transaction_id, t.kind, t.description, a.kind AS account,
                e.amount_minor, t.order_id, t.seller_order_id
           FROM ledger_entries e
           JOIN ledger_accounts a ON a.id = e.account_id
           JOIN ledger_transactions t ON t.id = e.transaction_id
          WHERE a.shop_id = $1
          ORDER BY e.created_at DESC, e.id DESC LIMIT $2 OFFSET $3",
    )
    .bind(seller.shop_id)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id WHERE a.shop_id = $1",
    )
    .bind(seller.shop_id)
    .fetch_one(&state.pool)
    .await?;
    Ok(Json(paging.page(items, total)))
}
