//! The HTTP application: routes, middleware, and the OpenAPI document
//! generated from the handlers.

use axum::{
    Json, Router, extract::DefaultBodyLimit, middleware, response::IntoResponse, routing::get,
};
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};
use utoipa_scalar::{Scalar, Servable};

use crate::{
    error::{ApiError, Problem},
    middleware::{http_metrics, request_id},
    routes::{
        addresses, admin, admin_accounts, admin_ops, admin_orders, auth, avatar, balance, cart,
        catalog, checkout, coupons, health, me, memberships, moderation, notifications, orders,
        payment_methods, product_images, products, refund_requests, replenishments, reviews, sales,
        seller_orders, shops, sso, stock, stripe_webhook, support, withdrawals,
    },
    state::AppState,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Souk API",
        description = "Multi-vendor marketplace backend. Errors are RFC 9457 problem+json.",
    ),
    components(schemas(Problem)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the `bearer` security scheme that protected routes name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The `/api/v1` routes and their OpenAPI paths.
fn v1(upload_limit: usize) -> OpenApiRouter<AppState> {
    // Uploads get their own body limit (plus room for the multipart framing).
    let uploads = OpenApiRouter::new()
        .routes(routes!(avatar::upload, avatar::remove))
        .routes(routes!(product_images::upload))
        .routes(routes!(reviews::add_image))
        .routes(routes!(refund_requests::add_image))
        .layer(DefaultBodyLimit::max(upload_limit + 64 * 1024));
    OpenApiRouter::new()
        .merge(uploads)
        .routes(routes!(avatar::serve))
        .routes(routes!(product_images::serve))
        .routes(routes!(product_images::remove))
        .routes(routes!(product_images::reorder))
        .routes(routes!(reviews::create, reviews::list))
        .routes(routes!(reviews::reply))
        .routes(routes!(reviews::remove))
        .routes(routes!(reviews::serve_image))
        .routes(routes!(support::create))
        .routes(routes!(auth::register))
        .routes(routes!(auth::verify_email))
        .routes(routes!(auth::sign_in))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::sign_out))
        .routes(routes!(auth::sign_out_everywhere))
        .routes(routes!(auth::resend_verification))
        .routes(routes!(auth::forgot_password))
        .routes(routes!(auth::reset_password))
        .routes(routes!(sso::start))
        .routes(routes!(sso::callback))
        .routes(routes!(auth::change_password))
        .routes(routes!(me::me, me::update))
        .routes(routes!(shops::get, shops::update))
        .routes(routes!(addresses::list, addresses::create))
        .routes(routes!(
            addresses::get,
            addresses::update,
            addresses::delete
        ))
        .routes(routes!(addresses::set_default))
        .routes(routes!(admin::suspend))
        .routes(routes!(admin::unsuspend))
        .routes(routes!(moderation::list))
        .routes(routes!(moderation::hide))
        .routes(routes!(moderation::unhide))
        .routes(routes!(moderation::create_category))
        .routes(routes!(notifications::list))
        .routes(routes!(notifications::mark_read))
        .routes(routes!(products::create, products::list))
        .routes(routes!(products::get, products::update))
        .routes(routes!(products::add_variant))
        .routes(routes!(products::update_variant))
        .routes(routes!(stock::adjust, stock::history))
        .routes(routes!(sales::create, sales::list))
        .routes(routes!(sales::cancel))
        .routes(routes!(catalog::list))
        .routes(routes!(catalog::get))
        .routes(routes!(catalog::shop_products))
        .routes(routes!(catalog::categories))
        .routes(routes!(cart::get))
        .routes(routes!(cart::add))
        .routes(routes!(cart::update, cart::remove))
        .routes(routes!(cart::apply_coupon, cart::remove_coupon))
        .routes(routes!(coupons::seller_create, coupons::seller_list))
        .routes(routes!(coupons::seller_disable))
        .routes(routes!(coupons::admin_create, coupons::admin_list))
        .routes(routes!(coupons::admin_disable))
        .routes(routes!(checkout::checkout))
        .routes(routes!(orders::mine))
        .routes(routes!(orders::get))
        .routes(routes!(orders::tracking))
        .routes(routes!(orders::cancel))
        .routes(routes!(seller_orders::list))
        .routes(routes!(seller_orders::get))
        .routes(routes!(seller_orders::update_status))
        .routes(routes!(seller_orders::cancel))
        .routes(routes!(admin_orders::list))
        .routes(routes!(admin_orders::get))
        .routes(routes!(admin_orders::get_seller_order))
        .routes(routes!(admin_orders::correct_status))
        .routes(routes!(admin_orders::flagged_payments))
        .routes(routes!(admin_orders::set_commission))
        .routes(routes!(stripe_webhook::receive))
        .routes(routes!(balance::balance))
        .routes(routes!(balance::entries))
        .routes(routes!(withdrawals::get_details, withdrawals::set_details))
        .routes(routes!(withdrawals::request, withdrawals::mine))
        .routes(routes!(withdrawals::one_of_mine))
        .routes(routes!(withdrawals::all))
        .routes(routes!(withdrawals::to_pay))
        .routes(routes!(withdrawals::approve))
        .routes(routes!(withdrawals::reject))
        .routes(routes!(refund_requests::open, refund_requests::of_order))
        .routes(routes!(refund_requests::serve_image))
        .routes(routes!(refund_requests::shop_list))
        .routes(routes!(refund_requests::seller_approve))
        .routes(routes!(refund_requests::seller_reject))
        .routes(routes!(refund_requests::admin_list))
        .routes(routes!(refund_requests::admin_approve))
        .routes(routes!(refund_requests::admin_reject))
        .routes(routes!(admin_orders::cancel))
        .routes(routes!(admin_orders::refund))
        .routes(routes!(admin_accounts::search))
        .routes(routes!(admin_accounts::set_role))
        .routes(routes!(admin_accounts::shops))
        .routes(routes!(admin_accounts::approve_shop))
        .routes(routes!(admin_accounts::suspend_shop))
        .routes(routes!(admin_accounts::unsuspend_shop))
        .routes(routes!(admin_ops::events))
        .routes(routes!(admin_ops::stripe_events))
        .routes(routes!(admin_ops::parked_list))
        .routes(routes!(admin_ops::parked_replay))
        .routes(routes!(admin_ops::audit_log))
        .routes(routes!(memberships::create_plan, memberships::admin_plans))
        .routes(routes!(memberships::retire_plan))
        .routes(routes!(memberships::plans))
        .routes(routes!(memberships::subscribe, memberships::mine))
        .routes(routes!(memberships::cancel))
        .routes(routes!(payment_methods::start, payment_methods::list))
        .routes(routes!(payment_methods::get, payment_methods::remove))
        .routes(routes!(payment_methods::confirm))
        .routes(routes!(replenishments::create, replenishments::list))
        .routes(routes!(replenishments::get, replenishments::update))
        .routes(routes!(replenishments::pause))
        .routes(routes!(replenishments::resume))
        .routes(routes!(replenishments::skip_next))
        .routes(routes!(replenishments::cancel))
}

/// The OpenAPI document, as served at `/openapi.json` (and committed as
/// `docs/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    build(0).1
}

fn build(upload_limit: usize) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .nest("/api/v1", v1(upload_limit))
        .split_for_parts()
}

/// The whole HTTP application.
pub fn router(state: AppState, body_limit: usize, upload_limit: usize) -> Router {
    let (api, doc) = build(upload_limit);
    let doc_json = doc.clone();
    api.route("/openapi.json", get(move || async move { Json(doc_json) }))
        .merge(Scalar::with_url("/docs", doc))
        .route("/metrics", get(health::metrics))
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn(http_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}
