pub mod health;
pub mod support;
