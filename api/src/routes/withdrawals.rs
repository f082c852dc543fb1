//! Getting money out: a shop's payout details (the account number encrypted
//! at rest, shown masked), its withdrawal requests, and admins paying or
//! turning them down. A request sets the money aside in the ledger at once
//! (available → withdrawing); paying moves it out (→ payouts), turning it
//! down gives it back. Requests lock the shop's available account, so
//! concurrent ones can never take more than the balance, and a shop has at
//! most one open request. A request keeps the account it was made to
//! (sealed on its own row, like the payout details): changing the payout
//! details afterwards never redirects money already asked for.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use souk_shared::{
    ledger::{self, postings, postings::WithdrawalStep},
    notify,
};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Admin, Seller},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, ValidQuery, Validate},
    idempotency::{self, Key, Keyed},
    middleware::RequestId,
    routes::{
        admin::{Reason, audit},
        catalog::{Page, Paging},
    },
    sealed::{self, Sealed},
    state::AppState,
};

/// An IBAN without spaces, upper case, if its check digits add up.
fn iban(raw: &str) -> Option<String> {
    let iban: String = raw
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    let shape = (15..=34).contains(&iban.len())
        && iban[..2].chars().all(|c| c.is_ascii_uppercase())
        && iban[2..4].chars().all(|c| c.is_ascii_digit())
        && iban.chars().all(|c| c.is_ascii_alphanumeric());
    if !shape {
        return None;
    }
    // ISO 13616: move the first four to the end, letters to numbers, mod 97 == 1.
    let rearranged = iban[4..].chars().chain(iban[..4].chars());
    let remainder = rearranged.fold(0u32, |acc, c| {
        let digits = c.to_digit(36).expect("alphanumeric");
        if digits < 10 {
            (acc * 10 + digits) % 97
        } else {
            (acc * 100 + digits) % 97
        }
    });
    (remainder == 1).then_some(iban)
}

/// `DE** **** **** **** **30 00`: the country and the last four only.
fn masked(country: &str, last4: &str) -> String {
    format!("{country}** **** **** {last4}")
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayoutDetailsInput {
    pub holder_name: String,
    /// The account to pay into.
    #[schema(example = "DE89 3704 0044 0532 0130 00")]
    pub iban: String,
}

impl Validate for PayoutDetailsInput {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let n = self.holder_name.trim().chars().count();
        if n == 0 || n > 100 {
            errors.push(FieldError::new(
                "holder_name",
                "must be 1 to 100 characters",
            ));
        }
        if iban(&self.iban).is_none() {
            errors.push(FieldError::new(
                "iban",
                "is not a valid IBAN (check the digits)",
            ));
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PayoutDetails {
    pub holder_name: String,
    /// Only the country and the last four characters.
    pub iban_masked: String,
    pub updated_at: DateTime<Utc>,
}

/// A shop's payout details as stored.
#[derive(sqlx::FromRow)]
struct Stored {
    holder_name: String,
    iban_ciphertext: Vec<u8>,
    iban_nonce: Vec<u8>,
    iban_last4: String,
    updated_at: DateTime<Utc>,
}

async fn stored(conn: &mut PgConnection, shop: Uuid) -> Result<Option<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT holder_name, iban_ciphertext, iban_nonce, iban_last4, updated_at FROM payout_details WHERE shop_id = $1",
    )
    .bind(shop)
    .fetch_optional(conn)
    .await
}

/// A sealed account number in the clear. Both the payout details and each
/// withdrawal's copy of them are bound to the shop's id, so a withdrawal's
/// account opens only for the shop that asked for it.
fn open_iban(
    state: &AppState,
    shop: Uuid,
    ciphertext: &[u8],
    nonce: &[u8],
) -> Result<String, ApiError> {
    let sealed = Sealed {
        ciphertext: ciphertext.to_vec(),
        nonce: nonce.to_vec(),
    };
    sealed::open(&state.market.payout_details_key, &sealed, shop.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("an account number of shop {shop} does not decrypt").into())
}

impl Stored {
    /// The account number in the clear, for masking.
    fn iban(&self, state: &AppState, shop: Uuid) -> Result<String, ApiError> {
        open_iban(state, shop, &self.iban_ciphertext, &self.iban_nonce)
    }
}

/// The shop's payout details, masked.
#[utoipa::path(
    get, path = "/seller/payout-details", tag = "seller", security(("bearer" = [])),
    responses(
        (status = 200, description = "the details, masked", body = PayoutDetails),
        (status = 404, description = "none set yet", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_details(
    State(state): State<AppState>,
    seller: Seller,
) -> Result<Json<PayoutDetails>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let details = stored(&mut conn, seller.shop_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let iban = details.iban(&state, seller.shop_id)?;
    Ok(Json(PayoutDetails {
        iban_masked: masked(&iban[..2], &details.iban_last4),
        holder_name: details.holder_name,
        updated_at: details.updated_at,
    }))
}

/// Set where withdrawals are paid. The account number is stored encrypted.
///
/// The new details apply to withdrawals requested from now on. A withdrawal
/// that is already open keeps the account (holder and IBAN) it was requested
/// to and is paid there, whatever the details say later; to have it paid
/// elsewhere, ask for it to be turned down and request it again. A change
/// of existing details is mailed to the shop's owner (who may not be the
/// one who made it, if the account was taken over).
#[utoipa::path(
    put, path = "/seller/payout-details", tag = "seller", security(("bearer" = [])),
    request_body = PayoutDetailsInput,
    responses(
        (status = 200, description = "the details, masked", body = PayoutDetails),
        (status = 422, description = "a bad IBAN or holder name", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn set_details(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    ValidJson(body): ValidJson<PayoutDetailsInput>,
) -> Result<Json<PayoutDetails>, ApiError> {
    seller.caller.require_verified()?;
    let iban = iban(&body.iban).expect("validated");
    let last4 = iban[iban.len() - 4..].to_string();
    let sealed = sealed::seal(
        &state.market.payout_details_key,
        &iban,
        seller.shop_id.as_bytes(),
    );
    let mut tx = state.pool.begin().await?;
    // `xmax <> 0`: the row was there before (a change, not the first set-up).
    let (updated_at, changed): (DateTime<Utc>, bool) = sqlx::query_as(
        "INSERT INTO payout_details (shop_id, holder_name, iban_ciphertext, iban_nonce, iban_last4)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (shop_id) DO UPDATE SET holder_name = excluded.holder_name,
             iban_ciphertext = excluded.iban_ciphertext, iban_nonce = excluded.iban_nonce,
             iban_last4 = excluded.iban_last4, updated_at = now()
         RETURNING updated_at, xmax <> 0",
    )
    .bind(seller.shop_id)
    .bind(body.holder_name.trim())
    .bind(&sealed.ciphertext)
    .bind(&sealed.nonce)
    .bind(&last4)
    .fetch_one(&mut *tx)
    .await?;
    if changed {
        let (email, name, shop, owner, open): (String, String, String, Uuid, i64) =
            sqlx::query_as(
                "SELECT u.email, u.name, s.name, u.id,
                        (SELECT count(*) FROM withdrawals w WHERE w.shop_id = s.id AND w.status = 'requested')
                   FROM shops s JOIN users u ON u.id = s.owner_id WHERE s.id = $1",
            )
            .bind(seller.shop_id)
            .fetch_one(&mut *tx)
            .await?;
        let data = json!({
            "name": name, "shop": shop, "holder_name": body.holder_name.trim(),
            "iban_masked": masked(&iban[..2], &last4), "changed_at": updated_at,
            "open_withdrawals": open,
        });
        notify::in_app(&mut tx, owner, "payout_details_changed", &data).await?;
        notify::email(
            &mut tx,
            &email,
            "payout_details_changed",
            data,
            &request_id.0,
        )
        .await?;
    }
    state.commit_with_messages(tx).await?;
    Ok(Json(PayoutDetails {
        holder_name: body.holder_name.trim().to_string(),
        iban_masked: masked(&iban[..2], &last4),
        updated_at,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Withdrawal {
    pub id: Uuid,
    pub amount_minor: i64,
    pub currency: String,
    /// `requested`, `paid` or `rejected`.
    pub status: String,
    pub holder_name: String,
    /// The account it goes to, masked.
    pub iban_last4: String,
    /// Why it was turned down (or a note with the payment).
    pub decision_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, amount_minor, currency, status, holder_name, iban_last4, decision_reason, created_at, decided_at";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WithdrawalRequest {
    pub amount_minor: i64,
}

impl Validate for WithdrawalRequest {
    fn validate(&self) -> Vec<FieldError> {
        if self.amount_minor > 0 {
            vec![]
        } else {
            vec![FieldError::new(
                "amount_minor",
                "must be a positive amount in minor units",
            )]
        }
    }
}

async fn shop_may_withdraw(conn: &mut PgConnection, shop: Uuid) -> Result<(), ApiError> {
    let (approved, suspended): (bool, bool) = sqlx::query_as(
        "SELECT approved_at IS NOT NULL, suspended_at IS NOT NULL FROM shops WHERE id = $1",
    )
    .bind(shop)
    .fetch_one(conn)
    .await?;
    if !approved || suspended {
        return Err(ApiError::ForbiddenBecause(FieldError::new(
            "shop",
            "a shop that is suspended or not approved yet cannot withdraw",
        )));
    }
    Ok(())
}

/// Ask for a payout of (part of) the available balance. One open request
/// at a time; at least the platform's minimum. `Idempotency-Key` makes a
/// retry return the first request.
#[utoipa::path(
    post, path = "/seller/withdrawals", tag = "seller", security(("bearer" = [])), request_body = WithdrawalRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key returns the same request")),
    responses(
        (status = 201, description = "requested; the amount is set aside", body = Withdrawal),
        (status = 403, description = "email not verified, or the shop cannot withdraw", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a request is already open", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "below the minimum, above the available balance, or no payout details", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn request(
    State(state): State<AppState>,
    seller: Seller,
    request_id: RequestId,
    headers: HeaderMap,
    ValidJson(body): ValidJson<WithdrawalRequest>,
) -> Result<(StatusCode, Json<Withdrawal>), ApiError> {
    seller.caller.require_verified()?;
    let key = Key::from_request(&headers, &body)?;
    let shop = seller.shop_id;
    let field =
        |message: String| ApiError::Validation(vec![FieldError::new("amount_minor", message)]);
    let mut tx = state.pool.begin().await?;
    // Every request and decision of this shop, and every release of its
    // earnings, queues here: the balance read below is the one the hold is
    // taken from, and what it owes to refunds agrees with it.
    ledger::lock_available(&mut tx, shop, &state.market.currency).await?;
    if let Some(key) = &key
        && let Some(id) = idempotency::earlier(&mut tx, Keyed::Withdrawals, shop, key).await?
    {
        let earlier = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM withdrawals WHERE id = $1"
        )))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        return Ok((StatusCode::CREATED, Json(earlier)));
    }
    shop_may_withdraw(&mut tx, shop).await?;
    if body.amount_minor < state.market.withdrawal_min_minor {
        return Err(field(format!(
            "the smallest withdrawal is {} (minor units)",
            state.market.withdrawal_min_minor
        )));
    }
    // The account as it is now, in one read: the request keeps it (still
    // sealed), so a later change of the details cannot redirect this money.
    let details: Option<(String, String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT holder_name, iban_last4, iban_ciphertext, iban_nonce FROM payout_details WHERE shop_id = $1",
    )
    .bind(shop)
    .fetch_optional(&mut *tx)
    .await?;
    let (holder, last4, ciphertext, nonce) = details.ok_or_else(|| {
        ApiError::Validation(vec![FieldError::new(
            "payout_details",
            "set your payout details first",
        )])
    })?;
    // Refunds already decided on released earnings will come out of the
    // available balance: what they will take is not the seller's to withdraw.
    // Two reads, one view: no release can commit between them, as it waits
    // for the lock taken above.
    let owed = ledger::waiting_refunds_owed(&mut tx, shop, &state.market.currency).await?;
    let balance = ledger::seller_balance(&mut tx, shop, &state.market.currency).await?;
    let withdrawable = balance.available_minor - owed;
    if body.amount_minor > withdrawable {
        return Err(field(if owed > 0 {
            format!(
                "more than your available balance less the refunds on their way ({})",
                withdrawable.max(0)
            )
        } else {
            format!("more than your available balance ({})", withdrawable.max(0))
        }));
    }
    let open: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM withdrawals WHERE shop_id = $1 AND status = 'requested')",
    )
    .bind(shop)
    .fetch_one(&mut *tx)
    .await?;
    if open {
        return Err(ApiError::Conflict(FieldError::new(
            "withdrawal",
            "a withdrawal is already waiting; wait for it to be paid or turned down",
        )));
    }
    let id = Uuid::now_v7();
    let withdrawal: Withdrawal = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO withdrawals (id, shop_id, requested_by, amount_minor, currency, iban_last4, holder_name,
                                  iban_ciphertext, iban_nonce, idempotency_key, request_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(shop)
    .bind(seller.caller.id)
    .bind(body.amount_minor)
    .bind(&state.market.currency)
    .bind(&last4)
    .bind(&holder)
    .bind(&ciphertext)
    .bind(&nonce)
    .bind(key.as_ref().map(|k| &k.key))
    .bind(key.as_ref().map(|k| &k.hash))
    .fetch_one(&mut *tx)
    .await?;
    postings::withdrawal(&mut tx, id, WithdrawalStep::Hold)
        .await
        .map_err(anyhow::Error::from)?;
    let shop_name = tell_seller(
        &mut tx,
        &withdrawal,
        shop,
        "withdrawal_requested",
        &request_id.0,
    )
    .await?;
    // Money waits on an admin's decision: they hear of it by mail too.
    let data = json!({
        "withdrawal_id": id, "shop_id": shop, "shop": shop_name,
        "amount_minor": withdrawal.amount_minor, "currency": withdrawal.currency,
    });
    notify::admins_by_mail(
        &mut tx,
        "withdrawal_requested",
        "admin_withdrawal_requested",
        &data,
        &request_id.0,
    )
    .await?;
    state.commit_with_messages(tx).await?;
    Ok((StatusCode::CREATED, Json(withdrawal)))
}

async fn tell_seller(
    conn: &mut PgConnection,
    w: &Withdrawal,
    shop: Uuid,
    template: &str,
    corr: &str,
) -> Result<String, sqlx::Error> {
    let (email, name, shop_name, owner): (String, String, String, Uuid) = sqlx::query_as(
        "SELECT u.email, u.name, s.name, u.id FROM shops s JOIN users u ON u.id = s.owner_id WHERE s.id = $1",
    )
    .bind(shop)
    .fetch_one(&mut *conn)
    .await?;
    let data = json!({
        "name": name, "shop": shop_name, "withdrawal_id": w.id, "amount_minor": w.amount_minor,
        "currency": w.currency, "iban_last4": w.iban_last4, "reason": w.decision_reason,
    });
    notify::in_app(conn, owner, template, &data).await?;
    notify::email(conn, &email, template, data, corr).await?;
    Ok(shop_name)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WithdrawalQuery {
    /// `requested`, `paid` or `rejected`.
    pub status: Option<String>,
    pub page: Option<u32>,
    pub per_page: Option<u32>,
}

impl Validate for WithdrawalQuery {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Paging::check(self.page, self.per_page);
        if self
            .status
            .as_deref()
            .is_some_and(|s| !matches!(s, "requested" | "paid" | "rejected"))
        {
            errors.push(FieldError::new(
                "status",
                "must be requested, paid or rejected",
            ));
        }
        errors
    }
}

async fn list(
    state: &AppState,
    shop: Option<Uuid>,
    query: &WithdrawalQuery,
) -> Result<Page<Withdrawal>, ApiError> {
    let paging = Paging::new(query.page, query.per_page);
    let filter = "($1::uuid IS NULL OR shop_id = $1) AND ($2::text IS NULL OR status = $2)";
    let items: Vec<Withdrawal> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE {filter} ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4"
    )))
    .bind(shop)
    .bind(&query.status)
    .bind(paging.limit())
    .bind(paging.offset())
    .fetch_all(&state.pool)
    .await?;
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM withdrawals WHERE {filter}"
    )))
    .bind(shop)
    .bind(&query.status)
    .fetch_one(&state.pool)
    .await?;
    Ok(paging.page(items, total))
}

/// The shop's withdrawals, newest first.
#[utoipa::path(
    get, path = "/seller/withdrawals", tag = "seller", security(("bearer" = [])), params(WithdrawalQuery),
    responses((status = 200, description = "a page of withdrawals", body = Page<Withdrawal>))
)]
pub async fn mine(
    State(state): State<AppState>,
    seller: Seller,
    ValidQuery(query): ValidQuery<WithdrawalQuery>,
) -> Result<Json<Page<Withdrawal>>, ApiError> {
    Ok(Json(list(&state, Some(seller.shop_id), &query).await?))
}

/// One of the shop's withdrawals (another shop's is not found).
#[utoipa::path(
    get, path = "/seller/withdrawals/{id}", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the withdrawal", body = Withdrawal),
        (status = 404, description = "no such withdrawal of this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn one_of_mine(
    State(state): State<AppState>,
    seller: Seller,
    Path(id): Path<Uuid>,
) -> Result<Json<Withdrawal>, ApiError> {
    let found: Option<Withdrawal> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE id = $1 AND shop_id = $2"
    )))
    .bind(id)
    .bind(seller.shop_id)
    .fetch_optional(&state.pool)
    .await?;
    Ok(Json(found.ok_or(ApiError::NotFound)?))
}

/// Every shop's withdrawals, newest first (`status=requested`: the queue to pay).
#[utoipa::path(
    get, path = "/admin/withdrawals", tag = "admin", security(("bearer" = [])), params(WithdrawalQuery),
    responses(
        (status = 200, description = "a page of withdrawals", body = Page<Withdrawal>),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn all(
    State(state): State<AppState>,
    _admin: Admin,
    ValidQuery(query): ValidQuery<WithdrawalQuery>,
) -> Result<Json<Page<Withdrawal>>, ApiError> {
    Ok(Json(list(&state, None, &query).await?))
}

/// A withdrawal with the full account number to pay it to (reading it is
/// kept in the audit log): the account it was requested to, not the shop's
/// payout details of today.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WithdrawalToPay {
    pub withdrawal: Withdrawal,
    pub shop: String,
    /// The holder as at the request.
    pub holder_name: String,
    /// The account as at the request, in full.
    pub iban: String,
}

/// A withdrawal and the full account to pay it to: the one it was requested
/// to, even if the shop's payout details changed since. The account is sealed
/// at rest, so reading it takes a reason (`?reason=`), kept in the audit log.
#[utoipa::path(
    get, path = "/admin/withdrawals/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path), Reason),
    responses(
        (status = 200, description = "the withdrawal and where to pay it", body = WithdrawalToPay),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such withdrawal", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "decided before withdrawals kept their account: it is not on record", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no reason given", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn to_pay(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidQuery(why): ValidQuery<Reason>,
) -> Result<Json<WithdrawalToPay>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let withdrawal: Withdrawal = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM withdrawals WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    // The withdrawal's own sealed account, never the payout details as they
    // are now: those may have changed since it was requested.
    let (shop_id, shop, ciphertext, nonce): (Uuid, String, Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as(
            "SELECT s.id, s.slug, w.iban_ciphertext, w.iban_nonce
               FROM withdrawals w JOIN shops s ON s.id = w.shop_id WHERE w.id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    // Only withdrawals decided before the account was kept on them lack it
    // (the schema requires it of every open one).
    let (Some(ciphertext), Some(nonce)) = (ciphertext, nonce) else {
        return Err(ApiError::Conflict(FieldError::new(
            "withdrawal",
            "this withdrawal was decided before withdrawals kept their account; it is not on record",
        )));
    };
    let iban = open_iban(&state, shop_id, &ciphertext, &nonce)?;
    let holder_name = withdrawal.holder_name.clone();
    audit(
        &mut tx,
        &admin,
        "withdrawal.read_payout_details",
        ("withdrawal", id),
        why.reason.trim(),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(WithdrawalToPay {
        withdrawal,
        shop,
        holder_name,
        iban,
    }))
}

/// Settles an open withdrawal one way or the other.
async fn decide(
    state: &AppState,
    admin: &Admin,
    id: Uuid,
    paid: bool,
    reason: &str,
    corr: &str,
) -> Result<Json<Withdrawal>, ApiError> {
    let mut tx = state.pool.begin().await?;
    // The shop's available account first, as a request takes it: paying
    // reads that balance, and a request or another decision of this shop
    // must not change it in between.
    let shop: Option<Uuid> = sqlx::query_scalar("SELECT shop_id FROM withdrawals WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let shop = shop.ok_or(ApiError::NotFound)?;
    ledger::lock_available(&mut tx, shop, &state.market.currency).await?;
    let (status, step, template) = if paid {
        ("paid", WithdrawalStep::Paid, "withdrawal_paid")
    } else {
        ("rejected", WithdrawalStep::Returned, "withdrawal_rejected")
    };
    let decided: Option<Withdrawal> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE withdrawals SET status = $2, decided_by = $3, decision_reason = $4, decided_at = now()
          WHERE id = $1 AND status = 'requested' RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(status)
    .bind(admin.0.id)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(withdrawal) = decided else {
        return Err(ApiError::Conflict(FieldError::new(
            "status",
            "this withdrawal was already decided",
        )));
    };
    // A shop suspended since it asked (fraud, say) is not paid out: its
    // request may only be turned down, or paid once it is reinstated.
    if paid {
        let suspended: bool = sqlx::query_scalar(
            "SELECT suspended_at IS NOT NULL FROM shops WHERE id = $1 FOR SHARE",
        )
        .bind(shop)
        .fetch_one(&mut *tx)
        .await?;
        if suspended {
            return Err(ApiError::Conflict(FieldError::new(
                "status",
                "the shop is suspended: turn the withdrawal down, or reinstate the shop first",
            )));
        }
        // A refund since the request (or one on its way) that left the
        // seller owing: paying now would send out money the seller no
        // longer has. It waits until later earnings make up for it, or is
        // turned down. Both read under the lock taken first: a release
        // (more balance, and its waiting refunds owed) lands before both
        // or after both, never between.
        let owed = ledger::waiting_refunds_owed(&mut tx, shop, &state.market.currency).await?;
        let balance = ledger::seller_balance(&mut tx, shop, &state.market.currency).await?;
        let short = owed - balance.available_minor;
        if short > 0 {
            return Err(ApiError::Conflict(FieldError::new(
                "status",
                format!(
                    "the shop owes {short} (minor units) to refunds made since it asked: \
                     turn the withdrawal down, or wait until its earnings make up for them"
                ),
            )));
        }
    }
    postings::withdrawal(&mut tx, id, step)
        .await
        .map_err(anyhow::Error::from)?;
    audit(
        &mut tx,
        admin,
        &format!("withdrawal.{status}"),
        ("withdrawal", id),
        reason,
    )
    .await?;
    tell_seller(&mut tx, &withdrawal, shop, template, corr).await?;
    state.commit_with_messages(tx).await?;
    Ok(Json(withdrawal))
}

/// Mark a withdrawal paid (after sending the money): it leaves the ledger
/// as paid out; the seller is told.
#[utoipa::path(
    post, path = "/admin/withdrawals/{id}/approve", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "paid", body = Withdrawal),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already decided, the shop is suspended, or it owes refunds (its available balance is below zero)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn approve(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<Withdrawal>, ApiError> {
    decide(&state, &admin, id, true, body.reason.trim(), &request_id.0).await
}

/// Turn a withdrawal down with a reason: the money is available again.
#[utoipa::path(
    post, path = "/admin/withdrawals/{id}/reject", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 200, description = "turned down", body = Withdrawal),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already decided", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reject(
    State(state): State<AppState>,
    admin: Admin,
    request_id: RequestId,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<Json<Withdrawal>, ApiError> {
    decide(&state, &admin, id, false, body.reason.trim(), &request_id.0).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ibans_are_checked_by_their_digits() {
        assert_eq!(
            iban("DE89 3704 0044 0532 0130 00").as_deref(),
            Some("DE89370400440532013000")
        );
        assert_eq!(
            iban("gb82west12345698765432").as_deref(),
            Some("GB82WEST12345698765432")
        );
        assert_eq!(iban("DE89 3704 0044 0532 0130 01"), None, "a wrong digit");
        assert_eq!(iban("DE89"), None);
        assert_eq!(masked("DE", "3000"), "DE** **** **** 3000");
    }
}
