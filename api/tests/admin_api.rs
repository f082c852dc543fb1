//! The admin API: every route refuses non-admins (checked from the route
//! table, so a new route cannot forget it), and admins find accounts,
//! change roles, approve and suspend shops, read the event and audit logs,
//! and replay parked messages, each action kept in the audit log.

mod common;

use common::{
    Pipeline, admin,
    catalog::{call, json_of, storefront, titles},
    fields,
    orders::customer,
    problem, signed_in, spawn_app, token_for, verified_seller,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_shared::{contracts::EmailRequested, envelope::Envelope, outbox};
use souk_testkit::{amqp_url, count, wait_until};

const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Every admin operation of the OpenAPI document, with placeholders in its path.
fn admin_routes() -> Vec<(Method, String)> {
    let doc = serde_json::to_value(souk_api::app::openapi()).unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1/admin/") {
            continue;
        }
        let concrete: String = path
            .split('/')
            .map(|segment| match segment {
                s if s.starts_with('{') && (s.contains("slug") || s.contains("group")) => {
                    "mailer".to_string()
                }
                s if s.starts_with('{') => uuid::Uuid::nil().to_string(),
                s => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            routes.push((method, concrete.trim_start_matches("/api/v1").to_string()));
        }
    }
    routes
}

#[tokio::test]
async fn every_admin_route_refuses_everyone_but_admins() {
    let app = spawn_app(&amqp_url()).await;
    let routes = admin_routes();
    assert!(
        routes.len() >= 30,
        "the admin API is all there: {}",
        routes.len()
    );
    let buyer = customer(&app).await;
    let seller = verified_seller(&app, "oak").await;
    let unverified = signed_in(&app, None).await;
    for (method, path) in &routes {
        for token in [&buyer.token, &seller, &unverified] {
            let resp = call(&app, token, method.clone(), path, json!({})).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        }
        let anonymous = app
            .http
            .request(method.clone(), format!("{}/api/v1{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(
            anonymous.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
    }
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM audit_log").await,
        0,
        "no refused call changed anything"
    );
    // And an admin gets past the check (a 2xx, or a 4xx about the request itself).
    let root = admin(&app).await;
    let root = token_for(&app, &root).await;
    for (method, path) in &routes {
        let status = call(&app, &root, method.clone(), path, json!({}))
            .await
            .status();
        assert!(
            status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
            "{method} {path}: {status}"
        );
    }
}

#[tokio::test]
async fn admins_find_accounts_and_change_roles_with_a_reason() {
    let app = spawn_app(&amqp_url()).await;
    let root = admin(&app).await;
    let root = token_for(&app, &root).await;
    let buyer = customer(&app).await;
    verified_seller(&app, "oak").await;

    let found = json_of(
        call(
            &app,
            &root,
            Method::GET,
            &format!("/admin/users?q={}", &buyer.email[..8]),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(found["total"], 1);
    assert_eq!(found["items"][0]["email"], buyer.email.as_str());
    let sellers = json_of(
        call(
            &app,
            &root,
            Method::GET,
            "/admin/users?role=seller",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(sellers["items"][0]["shop"], "oak");

    let path = format!("/admin/users/{}/role", buyer.id);
    let promoted = json_of(
        call(
            &app,
            &root,
            Method::PUT,
            &path,
            json!({"role": "admin", "reason": "joins the support team"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(promoted["role"], "admin");
    // The new role applies at once: the same token now opens the admin API.
    json_of(
        call(&app, &buyer.token, Method::GET, "/admin/users", json!({})).await,
        StatusCode::OK,
    )
    .await;
    let seller_id: uuid::Uuid = sqlx::query_scalar("SELECT owner_id FROM shops WHERE slug = 'oak'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let bad = call(
        &app,
        &root,
        Method::PUT,
        &format!("/admin/users/{seller_id}/role"),
        json!({"role": "admin", "reason": "x"}),
    )
    .await;
    assert_eq!(
        fields(&problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["role"]
    );
    let log = json_of(
        call(
            &app,
            &root,
            Method::GET,
            &format!("/admin/audit-log?target_id={}", buyer.id),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(log["items"][0]["action"], "user.role.admin");
    assert_eq!(log["items"][0]["reason"], "joins the support team");
}

#[tokio::test]
async fn new_sellers_wait_for_approval_and_a_suspended_shop_leaves_the_storefront() {
    let app = spawn_app(&amqp_url()).await;
    let root = admin(&app).await;
    let root = token_for(&app, &root).await;
    // A seller registers and publishes, but the shop is not approved yet.
    let seller = signed_in(&app, Some("fresh")).await;
    sqlx::query("UPDATE users SET email_verified_at = now() WHERE id = (SELECT owner_id FROM shops WHERE slug = 'fresh')")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let created = common::catalog::product(
        &app,
        &seller,
        common::catalog::simple("Fresh figs", "FIG-1", 900, 5),
    )
    .await;
    common::catalog::publish(&app, &seller, created["id"].as_str().unwrap()).await;
    assert!(titles(&storefront(&app, "/products").await).is_empty());
    problem(app.get("/api/v1/shops/fresh").await, StatusCode::NOT_FOUND).await;
    let waiting = json_of(
        call(
            &app,
            &root,
            Method::GET,
            "/admin/shops?status=pending",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(waiting["items"][0]["slug"], "fresh");
    // A shop suspended before it was approved is not waiting for approval.
    signed_in(&app, Some("banned")).await;
    sqlx::query(
        "UPDATE shops SET suspended_at = now(), suspended_reason = 'fraud' WHERE slug = 'banned'",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let shops = |status: &'static str| {
        let root = root.clone();
        let app = &app;
        async move {
            let page = json_of(
                call(
                    app,
                    &root,
                    Method::GET,
                    &format!("/admin/shops?status={status}"),
                    json!({}),
                )
                .await,
                StatusCode::OK,
            )
            .await;
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["slug"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(shops("pending").await, ["fresh"]);
    assert_eq!(shops("suspended").await, ["banned"]);

    let approve = json!({"reason": "documents checked"});
    json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/fresh/approve",
            approve.clone(),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(titles(&storefront(&app, "/products").await), ["Fresh figs"]);
    problem(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/fresh/approve",
            approve,
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;

    let suspend = json!({"reason": "counterfeit goods reported"});
    json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/fresh/suspend",
            suspend,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert!(titles(&storefront(&app, "/products").await).is_empty());
    let buyer = customer(&app).await;
    let add = json!({"variant_id": created["variants"][0]["id"], "quantity": 1});
    problem(
        call(&app, &buyer.token, Method::POST, "/cart/items", add).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/shops/fresh/unsuspend",
            json!({"reason": "cleared"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(titles(&storefront(&app, "/products").await), ["Fresh figs"]);
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY at")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        actions,
        ["shop.approved", "shop.suspended", "shop.reinstated"]
    );
}

#[tokio::test]
async fn admins_read_the_event_log_and_replay_parked_messages() {
    let app = spawn_app(&amqp_url()).await;
    let pipeline = Pipeline::start(&app, &amqp_url());
    let root = admin(&app).await;
    let root = token_for(&app, &root).await;
    // A mail no template exists for: the mailer parks it. It carries a
    // one-time link, which no admin view may show.
    let mail = EmailRequested {
        to: "nobody@example.com".into(),
        template: "no_such_template".into(),
        data: json!({"link": "https://souk.test/reset-password?token=live-secret"}),
    };
    let envelope = Envelope::new(&mail, "admin-test");
    let mut tx = app.db.pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &envelope).await.unwrap();
    tx.commit().await.unwrap();

    let events = json_of(
        call(
            &app,
            &root,
            Method::GET,
            "/admin/events?correlation_id=admin-test",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(events["items"][0]["type"], "notify.email");
    assert!(!events.to_string().contains("live-secret"), "{events}");
    let list = || async {
        json_of(
            call(&app, &root, Method::GET, "/admin/parked/mailer", json!({})).await,
            StatusCode::OK,
        )
        .await
    };
    wait_until("the mail to be parked", WAIT, || async {
        list().await.as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    let parked: Value = list().await;
    assert_eq!(parked[0]["message_id"], envelope.id.to_string());
    assert!(!parked.to_string().contains("live-secret"), "{parked}");
    assert!(parked[0]["body"].as_str().unwrap().contains("[redacted]"));
    assert!(
        parked[0]["error"]
            .as_str()
            .unwrap()
            .contains("no_such_template"),
        "{parked}"
    );
    problem(
        call(
            &app,
            &root,
            Method::GET,
            "/admin/parked/nosuchgroup",
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;

    // A message id that is not one is refused, never taken for "all".
    let bad = json!({"message_id": "not-an-id", "reason": "template deployed"});
    let bad = call(
        &app,
        &root,
        Method::POST,
        "/admin/parked/mailer/replay",
        bad,
    )
    .await;
    assert_eq!(
        fields(&problem(bad, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["message_id"]
    );
    let body = json!({"message_id": envelope.id.to_string(), "reason": "template deployed"});
    let replayed = json_of(
        call(
            &app,
            &root,
            Method::POST,
            "/admin/parked/mailer/replay",
            body,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(replayed["replayed"], 1);
    let log = json_of(
        call(
            &app,
            &root,
            Method::GET,
            "/admin/audit-log?target_type=message",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    // Newest first: what the replay did, after what was asked and why.
    assert_eq!(log["items"][0]["action"], "parked.replay.mailer.done");
    assert_eq!(log["items"][0]["reason"], "1 message(s) replayed");
    assert_eq!(log["items"][1]["action"], "parked.replay.mailer");
    // Still no template: it comes back to the parking queue, attempts reset.
    wait_until("the replayed mail to be parked again", WAIT, || async {
        list().await.as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    pipeline.stop().await;
}

/// The broker down: the replay answers 502, and the audit log keeps both
/// the request and that it did not happen.
#[tokio::test]
async fn a_replay_the_broker_refuses_is_kept_as_failed() {
    let app = spawn_app("amqp://guest:guest@127.0.0.1:9/souk-test").await;
    let root = token_for(&app, &admin(&app).await).await;
    let body = json!({"reason": "template deployed"});
    let resp = call(
        &app,
        &root,
        Method::POST,
        "/admin/parked/mailer/replay",
        body,
    )
    .await;
    problem(resp, StatusCode::BAD_GATEWAY).await;
    let kept: Vec<(String, String)> =
        sqlx::query_as("SELECT action, reason FROM audit_log ORDER BY id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(
        kept[0],
        ("parked.replay.mailer".into(), "template deployed".into())
    );
    assert_eq!(kept[1].0, "parked.replay.mailer.failed");
    assert!(kept[1].1.starts_with("not replayed: "), "{kept:?}");
}

#[tokio::test]
async fn an_admin_cancels_an_order_with_a_reason() {
    let market = common::orders::Market::open().await;
    let app = &market.app;
    let root = admin(app).await;
    let root = token_for(app, &root).await;
    let buyer = market.shopper(&[(&market.oak, 1)]).await;
    let paid = common::orders::checkout_and_pay(app, &market.stripe, &buyer.token).await;
    let id = paid["id"].as_str().unwrap();
    let path = format!("/admin/orders/{id}/cancel");
    let no_reason = call(app, &root, Method::POST, &path, json!({"reason": ""})).await;
    assert_eq!(
        fields(&problem(no_reason, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["reason"]
    );
    let cancelled = json_of(
        call(
            app,
            &root,
            Method::POST,
            &path,
            json!({"reason": "fraud check failed"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(cancelled["order"]["status"], "cancelled");
    common::orders::wait_for(app, &buyer.token, id, "refunded").await;
    let event = cancelled["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["to_status"] == "cancelled")
        .unwrap()
        .clone();
    assert_eq!(
        (event["actor_role"].as_str(), event["note"].as_str()),
        (Some("admin"), Some("fraud check failed"))
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'order.cancel'"
        )
        .await,
        1
    );
    market.close().await;
}

/// An admin demoted while an action of theirs is under way (past the
/// extractor's check, not yet committed): the action is refused when it is
/// kept in the audit log, and nothing of it stays.
#[tokio::test]
async fn an_admin_demoted_mid_action_cannot_finish_it() {
    let app = spawn_app(&amqp_url()).await;
    let (root, _, ids) = common::catalog::shelf(&app).await;
    let board = ids["Walnut cutting board"].as_str().unwrap().to_string();
    let mut demotion = app.db.pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET role = 'customer' WHERE role = 'admin'")
        .execute(&mut *demotion)
        .await
        .unwrap();
    let path = format!("/admin/products/{board}/hide");
    let hide = call(
        &app,
        &root,
        Method::POST,
        &path,
        json!({"reason": "counterfeit brand"}),
    );
    let demote = async {
        // The hide has read the (still) admin account and waits on its row.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        demotion.commit().await.unwrap();
    };
    let (resp, ()) = tokio::join!(hide, demote);
    problem(resp, StatusCode::FORBIDDEN).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM products WHERE hidden_at IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'product.hide'"
        )
        .await,
        0
    );
}

/// Two admins demoting each other at the same moment: the accounts' rows
/// queue, and the second finds it is no longer an admin. Run several
/// times, each way round: there is always exactly one admin left.
#[tokio::test]
async fn two_admins_removing_each_other_at_once_leave_one_admin() {
    let app = spawn_app(&amqp_url()).await;
    for round in 0..4 {
        let (a, b) = (admin(&app).await, admin(&app).await);
        let ids: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT id FROM users WHERE email = ANY($1) ORDER BY email = $2")
                .bind([&a, &b])
                .bind(&b)
                .fetch_all(&app.db.pool)
                .await
                .unwrap();
        let (a_id, b_id) = (ids[0], ids[1]);
        let (a, b) = (token_for(&app, &a).await, token_for(&app, &b).await);
        let demote = json!({"role": "customer", "reason": "handing over"});
        let suspend = json!({"reason": "handing over"});
        let role_path = format!("/admin/users/{b_id}/role");
        let suspend_path = format!("/admin/users/{a_id}/suspend");
        let a_demotes_b = call(&app, &a, Method::PUT, &role_path, demote);
        let b_suspends_a = call(&app, &b, Method::POST, &suspend_path, suspend);
        let (one, other) = if round % 2 == 0 {
            tokio::join!(a_demotes_b, b_suspends_a)
        } else {
            let (x, y) = tokio::join!(b_suspends_a, a_demotes_b);
            (y, x)
        };
        let done = [one.status(), other.status()];
        assert_eq!(
            done.iter().filter(|s| s.is_success()).count(),
            1,
            "round {round}: {done:?}"
        );
        // The loser is refused: no longer an admin (403), or suspended
        // already, its token dead (401).
        assert!(
            done.iter()
                .any(|s| matches!(*s, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED)),
            "round {round}: {done:?}"
        );
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM users WHERE id = ANY($1) AND role = 'admin' AND suspended_at IS NULL",
        )
        .bind([a_id, b_id])
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(active, 1, "round {round}");
    }
}

/// An admin action that would change nothing (the role the account has,
/// hiding a hidden product, showing a visible one) answers 409 saying why,
/// and writes nothing: no change, no audit entry claiming one.
#[tokio::test]
async fn admin_actions_that_change_nothing_are_refused_and_not_audited() {
    let app = spawn_app(&amqp_url()).await;
    let (root, _, ids) = common::catalog::shelf(&app).await;
    let buyer = customer(&app).await;
    let role_path = format!("/admin/users/{}/role", buyer.id);
    let set_role = |role: &'static str| {
        let body = json!({"role": role, "reason": "support team"});
        call(&app, &root, Method::PUT, &role_path, body)
    };
    let conflict = |resp| async move {
        let p = problem(resp, StatusCode::CONFLICT).await;
        (fields(&p), p.to_string())
    };
    let (field, said) = conflict(set_role("customer").await).await;
    assert_eq!(field, ["role"]);
    assert!(said.contains("already customer"), "{said}");
    json_of(set_role("admin").await, StatusCode::OK).await;
    assert_eq!(conflict(set_role("admin").await).await.0, ["role"]);

    let board = ids["Walnut cutting board"].as_str().unwrap().to_string();
    let moderate = |what: &'static str, reason: &'static str| {
        let path = format!("/admin/products/{board}/{what}");
        let (app, root) = (&app, &root);
        async move { call(app, root, Method::POST, &path, json!({"reason": reason})).await }
    };
    let (field, said) = conflict(moderate("unhide", "appeal upheld").await).await;
    assert_eq!(field, ["id"]);
    assert!(said.contains("not hidden"), "{said}");
    assert_eq!(
        moderate("hide", "counterfeit brand").await.status(),
        StatusCode::NO_CONTENT
    );
    let (field, said) = conflict(moderate("hide", "something else").await).await;
    assert_eq!(field, ["id"]);
    assert!(said.contains("already hidden"), "{said}");
    // The reason its seller was shown stands.
    let reason: String = sqlx::query_scalar("SELECT hidden_reason FROM products WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&board).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "counterfeit brand");
    assert_eq!(
        moderate("unhide", "appeal upheld").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(conflict(moderate("unhide", "again").await).await.0, ["id"]);
    // A product that does not exist is still a 404, not a conflict.
    let nowhere = format!("/admin/products/{}/unhide", uuid::Uuid::nil());
    problem(
        call(&app, &root, Method::POST, &nowhere, json!({"reason": "x"})).await,
        StatusCode::NOT_FOUND,
    )
    .await;

    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE target_type IN ('user', 'product') ORDER BY id",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        ["user.role.admin", "product.hide", "product.unhide"]
    );
}

/// A message parked in the mailer's parking queue, put there directly (no
/// worker runs: nothing consumes what a replay sends back).
async fn park_a_mail(
    app: &common::App,
) -> (lapin::Connection, souk_shared::topology::Names, String) {
    use souk_shared::{amqp, topology};
    let names = topology::Names::new(&app.prefix);
    let conn = amqp::connect(&amqp_url(), "admin-api-test").await.unwrap();
    let channel = amqp::confirm_channel(&conn).await.unwrap();
    topology::declare_queues(&channel, &names, "mailer", &[])
        .await
        .unwrap();
    let mail = EmailRequested {
        to: "nobody@example.com".into(),
        template: "no_such_template".into(),
        data: json!({}),
    };
    let envelope = Envelope::new(&mail, "admin-test");
    let id = envelope.id.to_string();
    let props = amqp::properties(
        &id,
        "notify.email",
        "admin-test",
        lapin::types::FieldTable::default(),
    );
    amqp::send_to_queue(
        &channel,
        &names.parking_queue("mailer"),
        &envelope.to_bytes(),
        props,
    )
    .await
    .unwrap();
    channel.close(200, "parked".into()).await.unwrap();
    (conn, names, id)
}

/// Replay goes through the same re-check as every admin action: an admin
/// demoted after the extractor let them in is refused (403), nothing is
/// replayed and nothing audited.
#[tokio::test]
async fn an_admin_demoted_mid_replay_replays_nothing() {
    use souk_shared::parked;
    let app = spawn_app(&amqp_url()).await;
    let root = token_for(&app, &admin(&app).await).await;
    let (conn, names, id) = park_a_mail(&app).await;
    let mut demotion = app.db.pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET role = 'customer' WHERE role = 'admin'")
        .execute(&mut *demotion)
        .await
        .unwrap();
    let replay = call(
        &app,
        &root,
        Method::POST,
        "/admin/parked/mailer/replay",
        json!({"reason": "template deployed"}),
    );
    let demote = async {
        // The replay has read the (still) admin account and waits on its row.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        demotion.commit().await.unwrap();
    };
    let (resp, ()) = tokio::join!(replay, demote);
    assert_eq!(
        fields(&problem(resp, StatusCode::FORBIDDEN).await),
        ["role"]
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM audit_log").await,
        0
    );
    let still = parked::list(&conn, &names, "mailer", 10).await.unwrap();
    assert_eq!(still.len(), 1, "{still:?}");
    assert_eq!(still[0].message_id.as_deref(), Some(id.as_str()));
}

/// The answer says how many went back and how many are still parked.
#[tokio::test]
async fn a_replay_says_how_many_remain_parked() {
    let app = spawn_app(&amqp_url()).await;
    let root = token_for(&app, &admin(&app).await).await;
    let (_conn, _names, _id) = park_a_mail(&app).await;
    let replay = |body: Value| {
        call(
            &app,
            &root,
            Method::POST,
            "/admin/parked/mailer/replay",
            body,
        )
    };
    let other = json!({"message_id": uuid::Uuid::nil(), "reason": "another one"});
    let answer = json_of(replay(other).await, StatusCode::OK).await;
    assert_eq!(answer, json!({"replayed": 0, "remaining": 1}));
    let all = json!({"reason": "template deployed"});
    let answer = json_of(replay(all).await, StatusCode::OK).await;
    assert_eq!(answer, json!({"replayed": 1, "remaining": 0}));
}
