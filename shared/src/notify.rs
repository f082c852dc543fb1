//! Telling people: a mail (through the outbox and the mailer) and an in-app
//! notification, each written in the caller's transaction so it exists
//! exactly when the change it is about does.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{contracts::EmailRequested, envelope::Envelope, outbox};

/// Queues the mail `template` with `data` to `to`.
pub async fn email(
    conn: &mut PgConnection,
    to: &str,
    template: &str,
    data: Value,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let mail = EmailRequested {
        to: to.to_string(),
        template: template.to_string(),
        data,
    };
    outbox::enqueue(conn, &Envelope::new(&mail, correlation_id)).await
}

/// Adds an in-app notification of `kind` for `user`.
pub async fn in_app(
    conn: &mut PgConnection,
    user: Uuid,
    kind: &str,
    data: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO notifications (id, user_id, kind, data) VALUES ($1, $2, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(user)
        .bind(kind)
        .bind(data)
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds an in-app notification of `kind` for every admin (something needs
/// a person: a flagged payment, a refund Stripe refused).
pub async fn admins(conn: &mut PgConnection, kind: &str, data: &Value) -> Result<(), sqlx::Error> {
    for (admin, _, _) in active_admins(conn).await? {
        in_app(conn, admin, kind, data).await?;
    }
    Ok(())
}

/// As [`admins`], and a mail `template` to each (`data` with the admin's
/// `name`): for what waits on an admin's decision, which an in-app notice
/// alone would leave unseen until someone opens the console.
pub async fn admins_by_mail(
    conn: &mut PgConnection,
    kind: &str,
    template: &str,
    data: &Value,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    for (admin, address, name) in active_admins(conn).await? {
        in_app(conn, admin, kind, data).await?;
        let mut mail = data.clone();
        if let Value::Object(fields) = &mut mail {
            fields.insert("name".into(), Value::String(name));
        }
        email(conn, &address, template, mail, correlation_id).await?;
    }
    Ok(())
}

async fn active_admins(
    conn: &mut PgConnection,
) -> Result<Vec<(Uuid, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, email, name FROM users WHERE role = 'admin' AND suspended_at IS NULL",
    )
    .fetch_all(&mut *conn)
    .await
}
