//! Getting money out: payout details encrypted at rest and shown masked,
//! withdrawals that can never take more than the balance, admins paying or
//! turning them down, and sellers who see only their own money.

mod common;

use common::{
    App, WITHDRAWAL_MIN_MINOR, admin,
    catalog::{call, json_of},
    fields,
    orders::{
        Market, assert_ledger_balances, checkout_and_pay, deliver, end_holds, mails_about, part_of,
        posted, seller_email,
    },
    problem, token_for,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_testkit::count;

const IBAN: &str = "DE89 3704 0044 0532 0130 00";

async fn withdraw(app: &App, seller: &str, amount: i64, key: Option<&str>) -> reqwest::Response {
    let mut req = app
        .http
        .post(format!("{}/api/v1/seller/withdrawals", app.base))
        .bearer_auth(seller)
        .json(&json!({"amount_minor": amount}));
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    req.send().await.unwrap()
}

async fn balance(app: &App, seller: &str) -> Value {
    json_of(
        call(app, seller, Method::GET, "/seller/balance", json!({})).await,
        StatusCode::OK,
    )
    .await
}

/// Oak sells two boards, delivers them and waits out the hold: 9000 + 499
/// shipping less 900 commission is available (8599).
async fn earned(market: &Market) {
    let Market {
        app, stripe, oak, ..
    } = market;
    let buyer = market.shopper(&[(oak, 2)]).await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    posted(app, "earning:%", 1).await;
    end_holds(app).await;
    let details = json!({"holder_name": "Layla Oak", "iban": IBAN});
    json_of(
        call(
            app,
            &oak.seller,
            Method::PUT,
            "/seller/payout-details",
            details,
        )
        .await,
        StatusCode::OK,
    )
    .await;
}

#[tokio::test]
async fn payout_details_are_encrypted_at_rest_and_shown_masked() {
    let market = Market::open().await;
    let Market { app, oak, .. } = &market;
    let missing = call(
        app,
        &oak.seller,
        Method::GET,
        "/seller/payout-details",
        json!({}),
    )
    .await;
    problem(missing, StatusCode::NOT_FOUND).await;
    let bad = json!({"holder_name": "Layla", "iban": "DE89 3704 0044 0532 0130 01"});
    let bad = problem(
        call(app, &oak.seller, Method::PUT, "/seller/payout-details", bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&bad), ["iban"]);

    let good = json!({"holder_name": "Layla Oak", "iban": IBAN});
    let set = json_of(
        call(
            app,
            &oak.seller,
            Method::PUT,
            "/seller/payout-details",
            good,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(set["iban_masked"], "DE** **** **** 3000");
    let read = json_of(
        call(
            app,
            &oak.seller,
            Method::GET,
            "/seller/payout-details",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(read["iban_masked"], "DE** **** **** 3000");
    assert!(!read.to_string().contains("0532"), "{read}");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT iban_ciphertext FROM payout_details")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&stored).contains("370400440532"),
        "not stored in the clear"
    );
    // Another seller has none; a customer is no seller.
    let tea_details = call(
        app,
        &market.tea.seller,
        Method::GET,
        "/seller/payout-details",
        json!({}),
    )
    .await;
    problem(tea_details, StatusCode::NOT_FOUND).await;
    let buyer = market.shopper(&[]).await;
    problem(
        call(
            app,
            &buyer.token,
            Method::GET,
            "/seller/payout-details",
            json!({}),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;
    market.close().await;
}

#[tokio::test]
async fn two_concurrent_withdrawals_never_take_more_than_the_balance() {
    let market = Market::open().await;
    earned(&market).await;
    let Market { app, oak, .. } = &market;
    assert_eq!(balance(app, &oak.seller).await["available_minor"], 8599);

    let too_small = withdraw(app, &oak.seller, WITHDRAWAL_MIN_MINOR - 1, None).await;
    assert_eq!(
        fields(&problem(too_small, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["amount_minor"]
    );
    let too_big = withdraw(app, &oak.seller, 8600, None).await;
    assert_eq!(
        fields(&problem(too_big, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["amount_minor"]
    );

    // Two at once, each for 6000 of 8599: one goes through.
    let (first, second) = tokio::join!(
        withdraw(app, &oak.seller, 6000, Some("tab-1")),
        withdraw(app, &oak.seller, 6000, Some("tab-2")),
    );
    let statuses = [first.status(), second.status()];
    assert!(statuses.contains(&StatusCode::CREATED), "{statuses:?}");
    assert!(
        statuses.contains(&StatusCode::CONFLICT)
            || statuses.contains(&StatusCode::UNPROCESSABLE_ENTITY),
        "{statuses:?}"
    );
    let now = balance(app, &oak.seller).await;
    assert_eq!(
        (
            now["available_minor"].as_i64(),
            now["withdrawing_minor"].as_i64()
        ),
        (Some(2599), Some(6000))
    );
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM withdrawals").await,
        1
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE kind = 'withdrawal_hold'"
        )
        .await,
        1
    );
    // The same request again answers the same withdrawal.
    let winner = if first.status() == StatusCode::CREATED {
        "tab-1"
    } else {
        "tab-2"
    };
    let again = json_of(
        withdraw(app, &oak.seller, 6000, Some(winner)).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM withdrawals").await,
        1
    );
    assert_eq!(again["status"], "requested");
    // The key with another amount is refused, naming the header.
    let reused = problem(
        withdraw(app, &oak.seller, 5000, Some(winner)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&reused), ["Idempotency-Key"]);
    // One open at a time.
    let second_open = problem(
        withdraw(app, &oak.seller, 1000, None).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&second_open), ["withdrawal"]);
    mails_about(&seller_email(app, "oak").await, "requested", 1).await;
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn an_admin_pays_or_turns_down_a_withdrawal_and_the_seller_is_told() {
    let market = Market::open().await;
    earned(&market).await;
    let Market { app, oak, tea, .. } = &market;
    let root = admin(app).await;
    let root = token_for(app, &root).await;
    let oak_email = seller_email(app, "oak").await;

    let w = json_of(
        withdraw(app, &oak.seller, 5000, None).await,
        StatusCode::CREATED,
    )
    .await;
    let id = w["id"].as_str().unwrap();
    let queue = json_of(
        call(
            app,
            &root,
            Method::GET,
            "/admin/withdrawals?status=requested",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(queue["total"], 1);
    let to_pay = json_of(
        call(
            app,
            &root,
            Method::GET,
            &format!("/admin/withdrawals/{id}"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(to_pay["iban"], "DE89370400440532013000");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.read_payout_details'"
        )
        .await,
        1
    );

    let reason = json!({"reason": "the account holder does not match the shop"});
    let rejected = json_of(
        call(
            app,
            &root,
            Method::POST,
            &format!("/admin/withdrawals/{id}/reject"),
            reason,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(
        balance(app, &oak.seller).await["available_minor"],
        8599,
        "the money is back"
    );
    let mail = mails_about(&oak_email, "turned down", 1).await;
    assert!(mail[0].text.contains("does not match"), "{}", mail[0].text);
    let twice = call(
        app,
        &root,
        Method::POST,
        &format!("/admin/withdrawals/{id}/approve"),
        json!({"reason": "x"}),
    )
    .await;
    problem(twice, StatusCode::CONFLICT).await;

    let w = json_of(
        withdraw(app, &oak.seller, 8599, None).await,
        StatusCode::CREATED,
    )
    .await;
    let id = w["id"].as_str().unwrap();
    let paid = json_of(
        call(
            app,
            &root,
            Method::POST,
            &format!("/admin/withdrawals/{id}/approve"),
            json!({"reason": "sent by SEPA"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(paid["status"], "paid");
    let after = balance(app, &oak.seller).await;
    assert_eq!(
        (
            after["available_minor"].as_i64(),
            after["withdrawing_minor"].as_i64()
        ),
        (Some(0), Some(0))
    );
    mails_about(&oak_email, "paid", 1).await;
    let history = json_of(
        call(
            app,
            &oak.seller,
            Method::GET,
            "/seller/withdrawals",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history["total"], 2);
    assert_eq!(history["items"][0]["iban_last4"], "3000");

    // Another seller sees none of it: its balance, ledger and withdrawals are its own.
    let tea_balance = balance(app, &tea.seller).await;
    assert_eq!(
        (
            tea_balance["available_minor"].as_i64(),
            tea_balance["pending_minor"].as_i64()
        ),
        (Some(0), Some(0))
    );
    let tea_ledger = json_of(
        call(app, &tea.seller, Method::GET, "/seller/ledger", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(tea_ledger["total"], 0);
    let oak_ledger = json_of(
        call(app, &oak.seller, Method::GET, "/seller/ledger", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert!(oak_ledger["total"].as_i64().unwrap() >= 5);
    let tea_list = json_of(
        call(
            app,
            &tea.seller,
            Method::GET,
            "/seller/withdrawals",
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(tea_list["total"], 0);
    for path in ["/admin/withdrawals", &format!("/admin/withdrawals/{id}")] {
        problem(
            call(app, &tea.seller, Method::GET, path, json!({})).await,
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    assert_ledger_balances(app).await;
    market.close().await;
}
