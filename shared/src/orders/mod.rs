//! Orders: the state machines ([`status`]), how an order's money splits per
//! seller ([`pricing`]), refunds ([`refunds`]) and what people are told
//! ([`notices`]).

pub mod cancel;
pub mod notices;
pub mod place;
pub mod pricing;
pub mod refunds;
pub mod status;

pub use status::{Actor, Change, MoveError, OrderStatus, Refused, SellerOrderStatus};
