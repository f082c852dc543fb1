//! The caller's address book. Every query is scoped to the caller, so
//! another account's address answers 404, never its data.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    state::AppState,
};

/// Most addresses one account may keep.
const MAX_ADDRESSES: i64 = 50;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressInput {
    pub full_name: String,
    pub line1: String,
    #[serde(default)]
    pub line2: String,
    pub city: String,
    #[serde(default)]
    pub region: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, e.g. `DE`.
    pub country: String,
    #[serde(default)]
    pub phone: String,
    /// Make this the default shipping address. The first address always is.
    #[serde(default)]
    pub default: bool,
}

impl Validate for AddressInput {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut text = |field: &str, value: &str, required: bool, max: usize| {
            let n = value.trim().chars().count();
            if required && n == 0 {
                errors.push(FieldError::new(field, "must not be empty"));
            } else if n > max {
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {max} characters"),
                ));
            }
        };
        text("full_name", &self.full_name, true, 100);
        text("line1", &self.line1, true, 200);
        text("line2", &self.line2, false, 200);
        text("city", &self.city, true, 100);
        text("region", &self.region, false, 100);
        text("postal_code", &self.postal_code, true, 20);
        text("phone", &self.phone, false, 30);
        if !(self.country.len() == 2 && self.country.chars().all(|c| c.is_ascii_uppercase())) {
            errors.push(FieldError::new(
                "country",
                "must be an ISO 3166-1 alpha-2 code such as DE",
            ));
        }
        errors
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Address {
    pub id: Uuid,
    pub full_name: String,
    pub line1: String,
    pub line2: String,
    pub city: String,
    pub region: String,
    pub postal_code: String,
    pub country: String,
    pub phone: String,
    /// The default shipping address.
    #[sqlx(rename = "is_default")]
    pub default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Binds the address fields as `$3`..`$10`, in the order both the insert
/// and the update list them.
fn bind_fields<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    body: &'q AddressInput,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(body.full_name.trim())
        .bind(body.line1.trim())
        .bind(body.line2.trim())
        .bind(body.city.trim())
        .bind(body.region.trim())
        .bind(body.postal_code.trim())
        .bind(&body.country)
        .bind(body.phone.trim())
}

const COLUMNS: &str = "id, full_name, line1, line2, city, region, postal_code, country, phone, is_default, created_at, updated_at";

async fn fetch(conn: &mut PgConnection, caller: &Caller, id: Uuid) -> Result<Address, ApiError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM addresses WHERE id = $1 AND user_id = $2"
    )))
    .bind(id)
    .bind(caller.id)
    .fetch_optional(conn)
    .await?
    .ok_or(ApiError::NotFound)
}

/// A transaction holding the caller's address book: every change to it
/// queues behind the others, so the cap, "the first address is the
/// default" and "one default" hold under concurrent requests (two tabs
/// making different addresses the default would otherwise both pass the
/// unsetting and one trip the one-default index).
async fn address_book(
    state: &AppState,
    caller: &Caller,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, ApiError> {
    let mut tx = state.pool.begin().await?;
    crate::auth::serialize_account(&mut tx, caller.id).await?;
    Ok(tx)
}

/// Makes `id` the caller's only default address.
async fn make_default(conn: &mut PgConnection, caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE addresses SET is_default = false WHERE user_id = $1 AND is_default AND id <> $2",
    )
    .bind(caller.id)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE addresses SET is_default = true WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(caller.id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The caller's addresses, the default first, then newest first.
#[utoipa::path(
    get, path = "/me/addresses", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "the address book", body = Vec<Address>),
        (status = 401, description = "not signed in", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Address>>, ApiError> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM addresses WHERE user_id = $1 ORDER BY is_default DESC, created_at DESC"
    )))
    .bind(caller.id)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(rows))
}

/// One of the caller's addresses.
#[utoipa::path(
    get, path = "/me/addresses/{id}", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "the address", body = Address),
        (status = 404, description = "no such address of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Address>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch(&mut conn, &caller, id).await?))
}

/// Add an address.
#[utoipa::path(
    post, path = "/me/addresses", tag = "account", security(("bearer" = [])), request_body = AddressInput,
    responses(
        (status = 201, description = "added", body = Address),
        (status = 422, description = "a field is invalid, or the book is full", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ValidJson(body): ValidJson<AddressInput>,
) -> Result<(StatusCode, Json<Address>), ApiError> {
    let mut tx = address_book(&state, &caller).await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM addresses WHERE user_id = $1")
        .bind(caller.id)
        .fetch_one(&mut *tx)
        .await?;
    if existing >= MAX_ADDRESSES {
        return Err(ApiError::Validation(vec![FieldError::new(
            "body",
            format!("an address book holds at most {MAX_ADDRESSES} addresses"),
        )]));
    }
    let id = Uuid::now_v7();
    let query = sqlx::query(
        "INSERT INTO addresses (id, user_id, full_name, line1, line2, city, region, postal_code, country, phone)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(caller.id);
    bind_fields(query, &body).execute(&mut *tx).await?;
    if body.default || existing == 0 {
        make_default(&mut tx, &caller, id).await?;
    }
    let address = fetch(&mut tx, &caller, id).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(address)))
}

/// Replace an address's fields.
#[utoipa::path(
    put, path = "/me/addresses/{id}", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = AddressInput,
    responses(
        (status = 200, description = "updated", body = Address),
        (status = 404, description = "no such address of the caller", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field is invalid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<AddressInput>,
) -> Result<Json<Address>, ApiError> {
    let mut tx = address_book(&state, &caller).await?;
    let query = sqlx::query(
        "UPDATE addresses SET full_name = $3, line1 = $4, line2 = $5, city = $6, region = $7,
                postal_code = $8, country = $9, phone = $10, updated_at = now()
          WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(caller.id);
    let done = bind_fields(query, &body).execute(&mut *tx).await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    if body.default {
        make_default(&mut tx, &caller, id).await?;
    }
    let address = fetch(&mut tx, &caller, id).await?;
    tx.commit().await?;
    Ok(Json(address))
}

/// Make an address the default shipping address.
#[utoipa::path(
    post, path = "/me/addresses/{id}/default", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "now the default", body = Address),
        (status = 404, description = "no such address of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn set_default(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<Json<Address>, ApiError> {
    let mut tx = address_book(&state, &caller).await?;
    fetch(&mut tx, &caller, id).await?; // 404 before touching anything
    make_default(&mut tx, &caller, id).await?;
    let address = fetch(&mut tx, &caller, id).await?;
    tx.commit().await?;
    Ok(Json(address))
}

/// Delete an address. If it was the default, the newest remaining one takes over.
#[utoipa::path(
    delete, path = "/me/addresses/{id}", tag = "account", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, description = "no such address of the caller", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut tx = address_book(&state, &caller).await?;
    let was_default: Option<bool> = sqlx::query_scalar(
        "DELETE FROM addresses WHERE id = $1 AND user_id = $2 RETURNING is_default",
    )
    .bind(id)
    .bind(caller.id)
    .fetch_optional(&mut *tx)
    .await?;
    match was_default {
        None => return Err(ApiError::NotFound),
        Some(true) => {
            let newest: Option<Uuid> = sqlx::query_scalar(
                "SELECT id FROM addresses WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1",
            )
            .bind(caller.id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(newest) = newest {
                make_default(&mut tx, &caller, newest).await?;
            }
        }
        Some(false) => {}
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
