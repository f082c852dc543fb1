//! The order and seller-order state machines: every status change of either
//! goes through [`move_order`] or [`move_seller_order`], which check the
//! transition against the tables below under the row's lock and append the
//! change to `order_events`. No other code writes a status.
//!
//! The diagrams are in `docs/orders.md`; a test below keeps them honest.

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

macro_rules! statuses {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some(Self::$variant),)* _ => None }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!("unknown status {s:?}"))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

statuses!(
    /// Where an order is between checkout and payment (and after, for money
    /// going back). Fulfilment is tracked per seller order.
    OrderStatus {
        Pending => "pending",
        Reserved => "reserved",
        AwaitingPayment => "awaiting_payment",
        Paid => "paid",
        PaymentFailed => "payment_failed",
        OutOfStock => "out_of_stock",
        Expired => "expired",
        Cancelled => "cancelled",
        Refunded => "refunded",
    }
);

statuses!(
    /// One seller's part of an order, from payment to the customer's door.
    SellerOrderStatus {
        Pending => "pending",
        Expired => "expired",
        Paid => "paid",
        Processing => "processing",
        Shipped => "shipped",
        Delivered => "delivered",
        Cancelled => "cancelled",
        Refunded => "refunded",
    }
);

impl OrderStatus {
    /// The order's transitions. Anything not listed is refused.
    pub fn may_become(self, next: Self) -> bool {
        use OrderStatus::*;
        matches!(
            (self, next),
            (Pending, Reserved | OutOfStock | Cancelled)
                // Paid straight from reserved: the webhook can arrive before
                // the payments worker stored the PaymentIntent.
                | (Reserved, AwaitingPayment | Paid | Expired | Cancelled)
                // A saved card charged off session (replenishment) is
                // declined before any intent is opened for payment.
                | (Reserved, PaymentFailed)
                | (AwaitingPayment, Paid | PaymentFailed | Expired | Cancelled)
                // A failed attempt may be retried with another card.
                | (PaymentFailed, Paid | Expired | Cancelled)
                // Paid after the reservation expired, the stock still there.
                | (Expired, Paid | Refunded)
                | (Paid, Cancelled | Refunded)
                | (Cancelled, Refunded)
        )
    }

    /// Whether the order's customer may still cancel it on their own (for a
    /// paid order, also no seller may have shipped yet).
    pub fn cancellable(self) -> bool {
        self.may_become(Self::Cancelled)
    }

    /// Whether `target` is this status or can still be reached from it
    /// through the transitions above.
    pub fn can_reach(self, target: Self) -> bool {
        let mut seen = vec![self];
        let mut next = vec![self];
        while let Some(at) = next.pop() {
            if at == target {
                return true;
            }
            for &to in Self::ALL {
                if at.may_become(to) && !seen.contains(&to) {
                    seen.push(to);
                    next.push(to);
                }
            }
        }
        false
    }

    /// Unpaid and still able to be paid: the client secret is shown.
    pub fn payable(self) -> bool {
        matches!(self, Self::AwaitingPayment | Self::PaymentFailed)
    }
}

impl SellerOrderStatus {
    /// The seller order's transitions. Anything not listed is refused.
    pub fn may_become(self, next: Self) -> bool {
        use SellerOrderStatus::*;
        matches!(
            (self, next),
            (Pending, Paid | Cancelled | Expired)
                | (Expired, Paid | Cancelled)
                | (Paid, Processing | Shipped | Cancelled)
                | (Processing, Shipped | Cancelled)
                | (Shipped, Delivered)
                | (Cancelled, Refunded)
        )
    }

    /// The fulfilment steps, which an admin may correct in any direction.
    pub fn is_fulfilment(self) -> bool {
        use SellerOrderStatus::*;
        matches!(self, Paid | Processing | Shipped | Delivered)
    }
}

/// Who made a change, as kept in the event trail.
#[derive(Debug, Clone, Copy)]
pub enum Actor {
    System,
    Customer(Uuid),
    Seller(Uuid),
    Admin(Uuid),
}

impl Actor {
    fn parts(self) -> (Option<Uuid>, &'static str) {
        match self {
            Self::System => (None, "system"),
            Self::Customer(id) => (Some(id), "customer"),
            Self::Seller(id) => (Some(id), "seller"),
            Self::Admin(id) => (Some(id), "admin"),
        }
    }
}

/// A change and why, for the event trail.
#[derive(Debug, Clone, Default)]
pub struct Change<'a> {
    pub note: Option<&'a str>,
    pub data: Option<serde_json::Value>,
    /// An admin's correction: allowed between any two fulfilment steps.
    pub correction: bool,
}

impl<'a> Change<'a> {
    pub fn note(note: &'a str) -> Self {
        Self {
            note: Some(note),
            ..Self::default()
        }
    }
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot move from {from} to {to}")]
pub struct Refused {
    pub from: String,
    pub to: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("no such order")]
    NotFound,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Moves an order to `to`, locking its row; returns the status it left.
pub async fn move_order(
    conn: &mut PgConnection,
    order: Uuid,
    to: OrderStatus,
    actor: Actor,
    change: Change<'_>,
) -> Result<OrderStatus, MoveError> {
    let from: Option<String> =
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(order)
            .fetch_optional(&mut *conn)
            .await?;
    let from = from
        .as_deref()
        .and_then(OrderStatus::parse)
        .ok_or(MoveError::NotFound)?;
    if !from.may_become(to) {
        return Err(Refused {
            from: from.to_string(),
            to: to.to_string(),
        }
        .into());
    }
    record(
        conn,
        "UPDATE orders SET status = $2, updated_at = now() WHERE id = $1",
        order,
        None,
        (from.as_str(), to.as_str()),
        actor,
        change,
    )
    .await?;
    Ok(from)
}

/// Moves a seller order to `to`, locking its row; returns the status it left.
pub async fn move_seller_order(
    conn: &mut PgConnection,
    seller_order: Uuid,
    to: SellerOrderStatus,
    actor: Actor,
    change: Change<'_>,
) -> Result<SellerOrderStatus, MoveError> {
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT order_id, status FROM seller_orders WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(seller_order)
    .fetch_optional(&mut *conn)
    .await?;
    let (order, from) = row.ok_or(MoveError::NotFound)?;
    let from = SellerOrderStatus::parse(&from).ok_or(MoveError::NotFound)?;
    // A correction moves between fulfilment steps only, never by the table:
    // `pending -> paid` there is the order's payment, not an admin's say.
    let allowed = if change.correction {
        from != to && from.is_fulfilment() && to.is_fulfilment()
    } else {
        from.may_become(to)
    };
    if !allowed {
        return Err(Refused {
            from: from.to_string(),
            to: to.to_string(),
        }
        .into());
    }
    record(
        conn,
        "UPDATE seller_orders SET status = $2, updated_at = now(),
                delivered_at = CASE WHEN $2 = 'delivered' THEN now()
                                    WHEN $2 IN ('paid', 'processing', 'shipped') THEN NULL ELSE delivered_at END,
                shipped_at = CASE WHEN $2 = 'shipped' THEN coalesce(shipped_at, now())
                                  WHEN $2 IN ('paid', 'processing') THEN NULL ELSE shipped_at END
          WHERE id = $1",
        order,
        Some(seller_order),
        (from.as_str(), to.as_str()),
        actor,
        change,
    )
    .await?;
    Ok(from)
}

/// Moves every unpaid (pending or expired) seller order of `order` to `to`
/// (paid, expired or cancelled with the order); returns the ones moved, in
/// id order.
pub async fn move_pending_parts(
    conn: &mut PgConnection,
    order: Uuid,
    to: SellerOrderStatus,
    actor: Actor,
    change: Change<'_>,
) -> Result<Vec<Uuid>, MoveError> {
    let parts: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM seller_orders
          WHERE order_id = $1 AND status IN ('pending', 'expired') AND status <> $2 ORDER BY id",
    )
    .bind(order)
    .bind(to.as_str())
    .fetch_all(&mut *conn)
    .await?;
    for part in &parts {
        move_seller_order(conn, *part, to, actor, change.clone()).await?;
    }
    Ok(parts)
}

/// Applies a move checked by the caller: `update` (the row `$1` to the
/// status `$2`) and its order event, in one statement.
async fn record(
    conn: &mut PgConnection,
    update: &str,
    order: Uuid,
    seller_order: Option<Uuid>,
    (from, to): (&str, &str),
    actor: Actor,
    change: Change<'_>,
) -> Result<(), sqlx::Error> {
    let (actor_id, role) = actor.parts();
    let mut data = change.data.unwrap_or_else(|| serde_json::json!({}));
    if change.correction {
        data["correction"] = serde_json::json!(true);
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH moved AS ({update})
         INSERT INTO order_events (id, order_id, seller_order_id, subject, from_status, to_status,
                                   actor_id, actor_role, note, data)
         VALUES ($3, $4, $5, $6, $7, $2, $8, $9, $10, $11)"
    )))
    .bind(seller_order.unwrap_or(order))
    .bind(to)
    .bind(Uuid::now_v7())
    .bind(order)
    .bind(seller_order)
    .bind(if seller_order.is_some() {
        "seller_order"
    } else {
        "order"
    })
    .bind(from)
    .bind(actor_id)
    .bind(role)
    .bind(change.note)
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagrams in docs/orders.md list exactly the transitions allowed here.
    #[test]
    fn the_documented_diagrams_match_the_tables() {
        let doc = include_str!("../../../docs/orders.md");
        let edges = |section: &str| -> Vec<(String, String)> {
            let start = doc.find(section).expect("section present");
            let body = &doc[start..];
            let body = &body[..body.find("```").expect("diagram ends")];
            body.lines()
                .filter_map(|l| l.trim().split_once(" --> "))
                .filter(|(from, _)| *from != "[*]")
                .filter_map(|(from, to)| {
                    let to = to.split(':').next().unwrap().trim();
                    (to != "[*]").then(|| (from.trim().to_string(), to.to_string()))
                })
                .collect()
        };
        let mut documented = edges("%% order\n");
        documented.sort();
        let mut coded: Vec<(String, String)> = OrderStatus::ALL
            .iter()
            .flat_map(|a| OrderStatus::ALL.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.may_become(*b))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        coded.sort();
        assert_eq!(documented, coded, "order diagram");

        let mut documented = edges("%% seller order\n");
        documented.sort();
        let mut coded: Vec<(String, String)> = SellerOrderStatus::ALL
            .iter()
            .flat_map(|a| SellerOrderStatus::ALL.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.may_become(*b))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        coded.sort();
        assert_eq!(documented, coded, "seller order diagram");
    }

    #[test]
    fn reachability_follows_the_transitions() {
        use OrderStatus::*;
        assert!(Pending.can_reach(Paid));
        assert!(Pending.can_reach(AwaitingPayment));
        assert!(Expired.can_reach(Paid), "a late payment");
        assert!(!OutOfStock.can_reach(Paid));
        assert!(!Paid.can_reach(AwaitingPayment));
        assert!(!Cancelled.can_reach(Paid));
        assert!(Paid.can_reach(Paid));
    }

    #[test]
    fn paid_orders_never_go_back_to_unpaid() {
        use OrderStatus::*;
        for back in [
            Pending,
            Reserved,
            AwaitingPayment,
            PaymentFailed,
            Expired,
            OutOfStock,
        ] {
            assert!(!Paid.may_become(back), "paid -> {back}");
        }
        // Once a parcel has left, only a refund (issue 6) can undo it.
        assert!(!SellerOrderStatus::Shipped.may_become(SellerOrderStatus::Cancelled));
        assert!(!SellerOrderStatus::Delivered.may_become(SellerOrderStatus::Cancelled));
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(*s));
        }
        for s in SellerOrderStatus::ALL {
            assert_eq!(SellerOrderStatus::parse(s.as_str()), Some(*s));
        }
    }
}
