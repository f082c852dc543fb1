pub mod addresses;
pub mod admin;
pub mod auth;
pub mod avatar;
pub mod health;
pub mod me;
pub mod shops;
pub mod support;
