//! Admin actions on accounts. Each is written to the audit log in the same
//! transaction as the change, with who, what, when and why.

use axum::{extract::State, http::StatusCode};
use serde::Deserialize;
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{
        Admin, end_all_sessions,
        links::{self, Purpose},
    },
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    state::AppState,
};

/// A reason: the body of an admin's change, or the query of an admin's read
/// of something sealed (a payout account).
#[derive(Debug, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// Why; kept with the change (and shown to whom it concerns: the account
    /// for a suspension, the customer for a cancelled seller order).
    pub reason: String,
}

/// A reason kept with a change (audit log, order history): 1 to 500 characters.
pub fn reason_error(reason: &str) -> Option<FieldError> {
    let n = reason.trim().chars().count();
    (n == 0 || n > 500).then(|| FieldError::new("reason", "must be 1 to 500 characters"))
}

impl Validate for Reason {
    fn validate(&self) -> Vec<FieldError> {
        reason_error(&self.reason).into_iter().collect()
    }
}

/// Locks the acting admin's and the target account's rows, in id order (two
/// admins acting on each other queue instead of deadlocking), and checks the
/// actor is still an active admin. Of two admins demoting or suspending each
/// other at once, the second then finds it is no longer one: the platform is
/// never left without an admin by a race.
pub(crate) async fn lock_actor_and_target(
    tx: &mut PgConnection,
    admin: &Admin,
    target: Uuid,
) -> Result<(), ApiError> {
    let rows: Vec<(Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, role, suspended_at IS NOT NULL FROM users
          WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind([admin.0.id, target])
    .fetch_all(&mut *tx)
    .await?;
    let still_admin = rows
        .iter()
        .any(|(id, role, suspended)| *id == admin.0.id && role == "admin" && !suspended);
    if !still_admin {
        return Err(no_longer_admin());
    }
    Ok(())
}

fn no_longer_admin() -> ApiError {
    ApiError::ForbiddenBecause(FieldError::new(
        "role",
        "your account is no longer an active admin",
    ))
}

/// Keeps an admin action in the audit log, in the action's transaction.
///
/// The `Admin` extractor checked the caller before the handler ran; an
/// admin demoted or suspended since must not see the action through. So the
/// actor's row is share-locked and checked again here, with the action's
/// changes still uncommitted: refused, they roll back with the transaction;
/// allowed, a demotion waits for the commit (the action was begun while an
/// admin, and is kept as such).
pub(crate) async fn audit(
    tx: &mut PgConnection,
    admin: &Admin,
    action: &str,
    target: (&str, Uuid),
    reason: &str,
) -> Result<(), ApiError> {
    let active: Option<bool> = sqlx::query_scalar(
        "SELECT role = 'admin' AND suspended_at IS NULL FROM users WHERE id = $1 FOR SHARE",
    )
    .bind(admin.0.id)
    .fetch_optional(&mut *tx)
    .await?;
    if active != Some(true) {
        return Err(no_longer_admin());
    }
    Ok(souk_shared::audit::record(tx, admin.0.id, action, target, reason).await?)
}

/// Suspend an account: its access tokens stop working at once and for good
/// (they stay dead after the suspension is lifted), all its sessions end and
/// its password-reset links are void.
#[utoipa::path(
    post, path = "/admin/users/{id}/suspend", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "suspended"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the account is already suspended", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no reason given, or an admin's own account", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn suspend(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    if id == admin.0.id {
        return Err(ApiError::Validation(vec![FieldError::new(
            "id",
            "admins cannot suspend themselves",
        )]));
    }
    let reason = body.reason.trim();
    let mut tx = state.pool.begin().await?;
    lock_actor_and_target(&mut tx, &admin, id).await?;
    // The first suspension's time and reason stay, and no second audit
    // entry claims a change.
    require_suspended(&mut tx, id, false).await?;
    sqlx::query(
        "UPDATE users SET suspended_at = now(), suspended_reason = $2, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    // Refusing suspended accounts on every request is not enough: lifting
    // the suspension would revive every access token issued before it. The
    // epoch moves on, so they stay dead, and the refresh tokens go with it.
    end_all_sessions(&mut tx, id).await?;
    // A reset link mailed before must not outlive the suspension either.
    links::revoke_all(&mut tx, Purpose::ResetPassword, id).await?;
    audit(&mut tx, &admin, "user.suspend", ("user", id), reason).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lift a suspension. The sessions it ended stay ended: the account signs
/// in again.
#[utoipa::path(
    post, path = "/admin/users/{id}/unsuspend", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = Reason,
    responses(
        (status = 204, description = "active again"),
        (status = 403, description = "not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such account", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the account is not suspended", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn unsuspend(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<Uuid>,
    ValidJson(body): ValidJson<Reason>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    // As for a suspension: an admin demoted or suspended meanwhile cannot.
    lock_actor_and_target(&mut tx, &admin, id).await?;
    require_suspended(&mut tx, id, true).await?;
    sqlx::query(
        "UPDATE users SET suspended_at = NULL, suspended_reason = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    audit(
        &mut tx,
        &admin,
        "user.unsuspend",
        ("user", id),
        body.reason.trim(),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 404 for no such account; 409 unless it is `suspended` as the caller
/// expects (read under the caller's lock on it): suspending or lifting
/// twice changes nothing, and writes no audit entry saying it did.
async fn require_suspended(
    tx: &mut PgConnection,
    id: Uuid,
    suspended: bool,
) -> Result<(), ApiError> {
    let found: Option<bool> =
        sqlx::query_scalar("SELECT suspended_at IS NOT NULL FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match found {
        None => Err(ApiError::NotFound),
        Some(is) if is == suspended => Ok(()),
        Some(_) if suspended => Err(ApiError::Conflict(FieldError::new(
            "id",
            "the account is not suspended",
        ))),
        Some(_) => Err(ApiError::Conflict(FieldError::new(
            "id",
            "the account is already suspended",
        ))),
    }
}
