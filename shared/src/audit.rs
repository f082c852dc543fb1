//! The audit log: who did what to which object, when and why. Every admin
//! action writes its entry, through the API or the `souk-admin` command.

use sqlx::PgConnection;
use uuid::Uuid;

/// Writes one entry on `conn` (in the transaction of the change it records,
/// where there is one).
pub async fn record(
    conn: &mut PgConnection,
    actor: Uuid,
    action: &str,
    (target_type, target_id): (&str, Uuid),
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (id, actor_id, action, target_type, target_id, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(actor)
    .bind(action)
    .bind(target_type)
    .bind(target_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}
