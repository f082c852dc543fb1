//! Message contracts: one payload type per message type, versioned.

use serde::{Deserialize, Serialize};

use crate::envelope::Contract;

/// Ask the mailer to render `template` with `data` and send it to `to`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmailRequested {
    pub to: String,
    pub template: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Contract for EmailRequested {
    const TYPE: &'static str = "notify.email";
    const VERSION: u16 = 1;
}

/// Declares a contract whose payload is one id.
macro_rules! id_contract {
    ($(#[$meta:meta])* $name:ident { $field:ident } = $type:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
        pub struct $name {
            pub $field: uuid::Uuid,
        }

        impl Contract for $name {
            const TYPE: &'static str = $type;
            const VERSION: u16 = 1;
        }
    };
}

id_contract!(
    /// A customer checked out: the order and its lines exist, nothing else yet.
    OrderPlaced { order_id } = "order.placed"
);
id_contract!(
    /// The order has its seller orders and totals: reserve its stock.
    OrderSplit { order_id } = "order.split"
);
id_contract!(
    /// Every line of the order is reserved: ask Stripe for a PaymentIntent.
    StockReserved { order_id } = "stock.reserved"
);
id_contract!(
    /// The order was cancelled (by its customer, or by an admin): release or
    /// restock its stock and cancel its PaymentIntent if it was never paid.
    OrderCancelled { order_id } = "order.cancelled"
);
id_contract!(
    /// The order's reservation ran out before it was paid: its stock is back
    /// on sale; cancel its PaymentIntent.
    OrderExpired { order_id } = "order.expired"
);
id_contract!(
    /// A seller cancelled its part of a paid order: put those units back.
    SellerOrderCancelled { seller_order_id } = "seller_order.cancelled"
);
id_contract!(
    /// A seller order reached the customer (for settlement).
    SellerOrderDelivered { seller_order_id } = "seller_order.delivered"
);
id_contract!(
    /// A refund was decided and recorded: send it through Stripe.
    RefundRequested { refund_id } = "payment.refund_requested"
);
id_contract!(
    /// An admin defined a membership plan: make it at Stripe.
    MembershipPlanCreated { plan_id } = "membership_plan.created"
);
id_contract!(
    /// A customer wants to save a card: a Stripe customer and a SetupIntent.
    PaymentMethodSetupRequested { payment_method_id } = "payment_method.setup_requested"
);
id_contract!(
    /// The storefront confirmed a SetupIntent (or Stripe said it succeeded):
    /// keep the card.
    PaymentMethodConfirmed { payment_method_id } = "payment_method.confirmed"
);
id_contract!(
    /// A customer removed a saved card: detach it at Stripe.
    PaymentMethodRemoved { payment_method_id } = "payment_method.removed"
);
id_contract!(
    /// A customer subscribes to a membership plan.
    MembershipRequested { membership_id } = "membership.requested"
);
id_contract!(
    /// A member cancels at the end of the period paid for.
    MembershipCancelRequested { membership_id } = "membership.cancel_requested"
);
id_contract!(
    /// A payment was captured (the order's, or one refunded as it came):
    /// the ledger records the money coming in.
    PaymentCaptured { payment_id } = "payment.captured"
);
id_contract!(
    /// Stripe refunded: the ledger records the money going back.
    RefundSucceeded { refund_id } = "refund.succeeded"
);

/// A PaymentIntent nobody will pay any more (its order expired or was
/// cancelled before the intent was stored): cancel it at Stripe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntentCancelRequested {
    pub order_id: uuid::Uuid,
    pub payment_intent_id: String,
}

impl Contract for IntentCancelRequested {
    const TYPE: &'static str = "payment.intent_cancel_requested";
    const VERSION: u16 = 1;
}

/// A verified Stripe webhook event was stored (`stripe_events`): apply it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StripeEventReceived {
    pub event_id: String,
    #[serde(rename = "event_type")]
    pub kind: String,
}

impl Contract for StripeEventReceived {
    const TYPE: &'static str = "stripe.event";
    const VERSION: u16 = 1;
}
