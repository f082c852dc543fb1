//! Memberships: the state machine their status follows, fed by Stripe's
//! subscription and invoice events (and the answers to Souk's own calls).
//!
//! ```text
//! requested -> incomplete | active | past_due | canceled | failed
//! incomplete -> active | canceled
//! active -> past_due | canceled
//! past_due -> active | canceled
//! ```
//!
//! News older than the last applied (by Stripe's event time) changes
//! nothing, and a move the machine does not allow is ignored, so events
//! delivered twice or out of order never move a membership backwards.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MembershipStatus {
    /// Asked for; the subscription is being made.
    Requested,
    /// The first payment has not gone through.
    Incomplete,
    Active,
    /// A renewal payment failed; Stripe retries it.
    PastDue,
    Canceled,
    /// The subscription could not be made.
    Failed,
}

impl MembershipStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Incomplete => "incomplete",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "requested" => Self::Requested,
            "incomplete" => Self::Incomplete,
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "canceled" => Self::Canceled,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// A Stripe subscription status as a membership's.
    pub fn from_stripe(status: &str) -> Option<Self> {
        Some(match status {
            "incomplete" => Self::Incomplete,
            "active" | "trialing" => Self::Active,
            "past_due" | "unpaid" => Self::PastDue,
            "canceled" | "incomplete_expired" => Self::Canceled,
            _ => return None,
        })
    }

    pub fn may_become(self, next: Self) -> bool {
        use MembershipStatus::*;
        matches!(
            (self, next),
            (Requested, Incomplete | Active | PastDue | Canceled | Failed)
                | (Incomplete, Active | Canceled)
                | (Active, PastDue | Canceled)
                | (PastDue, Active | Canceled)
        )
    }
}

/// What Stripe says about a membership's subscription.
#[derive(Debug, Clone, Default)]
pub struct News {
    pub status: Option<MembershipStatus>,
    pub cancel_at_period_end: Option<bool>,
    pub current_period_end: Option<DateTime<Utc>>,
    /// When Stripe made the change (the event's time); `None` for the
    /// answer to a call just made.
    pub at: Option<DateTime<Utc>>,
}

/// Applies news to a membership under its row lock; returns the status it
/// moved to, if it moved. The member is told of each move, and when Stripe
/// confirms that the membership ends with its period.
pub async fn apply(
    conn: &mut PgConnection,
    membership: Uuid,
    news: News,
    correlation_id: &str,
) -> Result<Option<MembershipStatus>, sqlx::Error> {
    let row: Option<(String, Option<DateTime<Utc>>, bool)> = sqlx::query_as(
        "SELECT status, status_at, cancel_at_period_end FROM memberships WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(membership)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, last, was_ending)) = row else {
        return Ok(None);
    };
    let now_ending = !was_ending && news.cancel_at_period_end == Some(true);
    if let (Some(at), Some(last)) = (news.at, last)
        && at < last
    {
        // Older news of the status, but a later period end is never old:
        // a renewal's subscription event arriving after its invoice's
        // (which carries no period end) still extends the paid period, or
        // the member would lose the benefits of a period paid for.
        if let Some(end) = news.current_period_end {
            sqlx::query(
                "UPDATE memberships SET current_period_end = greatest(current_period_end, $2),
                        updated_at = now()
                  WHERE id = $1 AND current_period_end IS DISTINCT FROM greatest(current_period_end, $2)",
            )
            .bind(membership)
            .bind(end)
            .execute(&mut *conn)
            .await?;
        }
        return Ok(None);
    }
    let current = MembershipStatus::parse(&status).expect("statuses are checked by the database");
    sqlx::query(
        "UPDATE memberships SET cancel_at_period_end = coalesce($2, cancel_at_period_end),
                current_period_end = coalesce($3, current_period_end),
                status_at = greatest(status_at, $4), updated_at = now()
          WHERE id = $1",
    )
    .bind(membership)
    .bind(news.cancel_at_period_end)
    .bind(news.current_period_end)
    .bind(news.at)
    .execute(&mut *conn)
    .await?;
    let Some(next) = news.status.filter(|next| current.may_become(*next)) else {
        if now_ending {
            tell(conn, membership, json!({}), correlation_id).await?;
        }
        return Ok(None);
    };
    sqlx::query("UPDATE memberships SET status = $2 WHERE id = $1")
        .bind(membership)
        .bind(next.as_str())
        .execute(&mut *conn)
        .await?;
    tell(conn, membership, json!({}), correlation_id).await?;
    Ok(Some(next))
}

/// Stripe confirmed that the membership ends with its period (the answer to
/// Souk's cancel call): recorded whatever older news said, and the member
/// told, once.
pub async fn confirm_ending(
    conn: &mut PgConnection,
    membership: Uuid,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let changed = sqlx::query(
        "UPDATE memberships SET cancel_at_period_end = true, updated_at = now()
          WHERE id = $1 AND NOT cancel_at_period_end",
    )
    .bind(membership)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if changed == 1 {
        tell(conn, membership, json!({}), correlation_id).await?;
    }
    Ok(())
}

/// Stripe refused to end the membership the member asked to cancel: it
/// goes on (and renews), so they must hear it, not only see it in the app.
pub async fn tell_cancel_refused(
    conn: &mut PgConnection,
    membership: Uuid,
    reason: &str,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let note = json!({ "cancel_failed": reason });
    tell(conn, membership, note, correlation_id).await
}

/// Mails the member and notifies them in the app of their membership as it
/// now stands, with `note`'s fields added.
async fn tell(
    conn: &mut PgConnection,
    membership: Uuid,
    note: serde_json::Value,
    correlation_id: &str,
) -> Result<(), sqlx::Error> {
    let (user, email, name, plan, status, cancel_at_period_end, period_end): (
        Uuid,
        String,
        String,
        String,
        String,
        bool,
        Option<DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT u.id, u.email, u.name, p.name, m.status, m.cancel_at_period_end, m.current_period_end
           FROM memberships m JOIN users u ON u.id = m.user_id JOIN membership_plans p ON p.id = m.plan_id
          WHERE m.id = $1",
    )
    .bind(membership)
    .fetch_one(&mut *conn)
    .await?;
    let mut data = json!({
        "name": name, "plan": plan, "status": status, "membership_id": membership,
        "cancel_at_period_end": cancel_at_period_end, "current_period_end": period_end,
    });
    if let (Some(data), serde_json::Value::Object(note)) = (data.as_object_mut(), note) {
        data.extend(note);
    }
    notify::in_app(conn, user, "membership_update", &data).await?;
    notify::email(conn, &email, "membership_update", data, correlation_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagram in docs/recurring.md lists exactly the moves allowed here.
    #[test]
    fn the_documented_diagram_matches_the_table() {
        use MembershipStatus::*;
        let doc = include_str!("../../docs/recurring.md");
        let start = doc.find("%% membership").expect("diagram present");
        let body = &doc[start..];
        let body = &body[..body.find("```").expect("diagram ends")];
        let mut documented: Vec<(String, String)> = body
            .lines()
            .filter_map(|l| l.trim().split_once(" --> "))
            .filter(|(from, to)| *from != "[*]" && !to.starts_with("[*]"))
            .map(|(from, to)| {
                (
                    from.to_string(),
                    to.split(':').next().unwrap().trim().to_string(),
                )
            })
            .collect();
        documented.sort();
        let all = [Requested, Incomplete, Active, PastDue, Canceled, Failed];
        let mut coded: Vec<(String, String)> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.may_become(*b))
            .map(|(a, b)| (a.as_str().to_string(), b.as_str().to_string()))
            .collect();
        coded.sort();
        assert_eq!(documented, coded);
    }

    #[test]
    fn an_ended_membership_stays_ended_and_active_never_goes_back_to_incomplete() {
        use MembershipStatus::*;
        assert!(!Active.may_become(Incomplete));
        assert!(!Canceled.may_become(Active));
        assert!(PastDue.may_become(Active));
        assert_eq!(MembershipStatus::from_stripe("trialing"), Some(Active));
        assert_eq!(
            MembershipStatus::from_stripe("incomplete_expired"),
            Some(Canceled)
        );
    }
}
