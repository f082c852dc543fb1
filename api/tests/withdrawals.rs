//! Getting money out: payout details encrypted at rest and shown masked,
//! withdrawals that can never take more than the balance, admins paying or
//! turning them down, and sellers who see only their own money.

mod common;

use common::{
    App, WAIT, WITHDRAWAL_MIN_MINOR, admin,
    catalog::{call, json_of},
    fields,
    orders::{
        Customer, Market, ask_refund, assert_ledger_balances, checkout_and_pay, counted, deliver,
        end_holds, ledger_balance, mails_about, part_of, posted, seller_email,
    },
    problem,
    stripe_proxy::payments_through,
    token_for,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_shared::ledger::{self, postings};
use souk_testkit::{count, mail::Mail};
use std::time::Duration;
use uuid::Uuid;

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
/// shipping less 900 commission is available (8599). Returns the buyer and
/// the paid order.
async fn earned(market: &Market) -> (Customer, Value) {
    let Market { app, oak, .. } = market;
    let (buyer, paid) = market.paid(&[(oak, 2)]).await;
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
    (buyer, paid)
}

/// The seller asks to withdraw all it has (8599, the order `earned` made);
/// before an admin decides, one board of `paid` comes back out of the
/// available balance, which had nothing left (-4050). The request's id.
async fn asked_all_then_owing(app: &App, buyer: &Customer, seller: &str, paid: &Value) -> String {
    let w = json_of(withdraw(app, seller, 8599, None).await, StatusCode::CREATED).await;
    return_one_board(app, buyer, seller, paid).await;
    posted(app, "refund:%", 1).await;
    w["id"].as_str().unwrap().to_string()
}

/// The buyer asks for one board (4500) of `paid` back and the seller
/// approves it: the refund goes to Stripe.
async fn return_one_board(app: &App, buyer: &Customer, seller: &str, paid: &Value) {
    let request = ask_refund(
        app,
        &buyer.token,
        paid,
        "Walnut board",
        1,
        "arrived cracked",
    )
    .await;
    assert_eq!(request["amount_minor"], 4500);
    let path = format!(
        "/seller/refund-requests/{}/approve",
        request["id"].as_str().unwrap()
    );
    json_of(
        call(app, seller, Method::POST, &path, json!({"restock": true})).await,
        StatusCode::OK,
    )
    .await;
}

/// An admin's decision on withdrawal `id` (`approve` or `reject`), taken.
async fn decide(app: &App, admin: &str, id: &str, decision: &str, reason: &str) -> Value {
    let path = format!("/admin/withdrawals/{id}/{decision}");
    json_of(
        call(app, admin, Method::POST, &path, json!({ "reason": reason })).await,
        StatusCode::OK,
    )
    .await
}

/// The seller's balance as (pending, available, withdrawing).
async fn balances(app: &App, seller: &str) -> (i64, i64, i64) {
    let b = balance(app, seller).await;
    let minor = |field: &str| {
        b[field]
            .as_i64()
            .unwrap_or_else(|| panic!("{field} in {b}"))
    };
    (
        minor("pending_minor"),
        minor("available_minor"),
        minor("withdrawing_minor"),
    )
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
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root_email = admin(app).await;
    let root = token_for(app, &root_email).await;
    let oak_email = seller_email(app, "oak").await;
    // A board more, delivered and still held: oak has money pending too.
    let buyer = market.shopper(&[(oak, 1)]).await;
    let held = checkout_and_pay(app, stripe, &buyer.token).await;
    deliver(app, &oak.seller, &part_of(&held, "oak")).await;
    posted(app, "earning:%", 2).await;

    let w = json_of(
        withdraw(app, &oak.seller, 5000, Some("oak-tab")).await,
        StatusCode::CREATED,
    )
    .await;
    let id = w["id"].as_str().unwrap();
    // The admins hear that money waits on their decision, by mail and in-app.
    let to_admin = mails_about(&root_email, "asks to withdraw", 1).await;
    assert!(to_admin[0].text.contains(id), "{}", to_admin[0].text);
    let notices = json_of(
        call(app, &root, Method::GET, "/me/notifications", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert!(
        notices.to_string().contains("withdrawal_requested"),
        "{notices}"
    );

    // While oak has money in all three balances, entries and an open
    // withdrawal, tea sees none of it: its balance, ledger and withdrawals
    // are its own.
    assert_eq!(balances(app, &oak.seller).await, (4549, 3599, 5000));
    assert_eq!(balances(app, &tea.seller).await, (0, 0, 0));
    let ledger_of = |seller: &str| {
        let seller = seller.to_string();
        async move {
            json_of(
                call(app, &seller, Method::GET, "/seller/ledger", json!({})).await,
                StatusCode::OK,
            )
            .await
        }
    };
    let oak_ledger = ledger_of(&oak.seller).await;
    assert_eq!(
        oak_ledger["total"], 6,
        "earning, release (two legs), earning, hold (two legs): {oak_ledger}"
    );
    let tea_ledger = ledger_of(&tea.seller).await;
    assert_eq!(tea_ledger["total"], 0, "{tea_ledger}");
    assert_eq!(tea_ledger["items"], json!([]));
    let withdrawals_of = |seller: &str| {
        let seller = seller.to_string();
        async move {
            json_of(
                call(app, &seller, Method::GET, "/seller/withdrawals", json!({})).await,
                StatusCode::OK,
            )
            .await
        }
    };
    assert_eq!(withdrawals_of(&oak.seller).await["total"], 1);
    let tea_list = withdrawals_of(&tea.seller).await;
    assert_eq!(tea_list["total"], 0, "{tea_list}");
    assert_eq!(tea_list["items"], json!([]));
    // Tea's withdrawals are checked against tea's balance (nothing), and
    // oak's Idempotency-Key and amount, sent by tea, are tea's own request,
    // never oak's withdrawal answered back.
    let details = json!({"holder_name": "Tea Shop", "iban": "GB82WEST12345698765432"});
    json_of(
        call(
            app,
            &tea.seller,
            Method::PUT,
            "/seller/payout-details",
            details,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    for key in [None, Some("oak-tab")] {
        let amount = if key.is_some() { 5000 } else { 1000 };
        let refused = withdraw(app, &tea.seller, amount, key).await;
        let refused = problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&refused), ["amount_minor"], "{refused}");
        assert!(!refused.to_string().contains(id), "{refused}");
    }
    // Oak reads its withdrawal; to tea it does not exist; the admin's
    // routes are closed to sellers.
    let one = format!("/seller/withdrawals/{id}");
    let mine = json_of(
        call(app, &oak.seller, Method::GET, &one, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (mine["status"].as_str(), mine["amount_minor"].as_i64()),
        (Some("requested"), Some(5000))
    );
    problem(
        call(app, &tea.seller, Method::GET, &one, json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    for path in ["/admin/withdrawals", &format!("/admin/withdrawals/{id}")] {
        problem(
            call(app, &tea.seller, Method::GET, path, json!({})).await,
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM withdrawals").await,
        1
    );

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
    // The sealed account is read only with a reason, kept in the audit log.
    let p = problem(
        call(
            app,
            &root,
            Method::GET,
            &format!("/admin/withdrawals/{id}"),
            json!({}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&p), ["reason"]);
    let to_pay = json_of(
        call(
            app,
            &root,
            Method::GET,
            &format!("/admin/withdrawals/{id}?reason=paying%20it%20by%20bank%20transfer"),
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
            "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.read_payout_details' AND reason = 'paying it by bank transfer'"
        )
        .await,
        1
    );

    let why = "the account holder does not match the shop";
    let rejected = decide(app, &root, id, "reject", why).await;
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
    let paid = decide(app, &root, id, "approve", "sent by SEPA").await;
    assert_eq!(paid["status"], "paid");
    assert_eq!(
        balances(app, &oak.seller).await,
        (4549, 0, 0),
        "paid out; the second board still held"
    );
    mails_about(&oak_email, "paid", 1).await;
    let history = withdrawals_of(&oak.seller).await;
    assert_eq!(history["total"], 2);
    assert_eq!(history["items"][0]["iban_last4"], "3000");
    // Still nothing of oak's shows to tea.
    assert_eq!(balances(app, &tea.seller).await, (0, 0, 0));
    assert_eq!(ledger_of(&tea.seller).await["total"], 0);
    assert_eq!(withdrawals_of(&tea.seller).await["total"], 0);
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn a_refund_after_a_payout_leaves_the_balance_negative_until_later_earnings_net_it() {
    let market = Market::open().await;
    let (buyer, paid) = earned(&market).await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;

    // Oak takes out everything it has (8599), and it is paid.
    let w = json_of(
        withdraw(app, &oak.seller, 8599, None).await,
        StatusCode::CREATED,
    )
    .await;
    decide(
        app,
        &root,
        w["id"].as_str().unwrap(),
        "approve",
        "sent by SEPA",
    )
    .await;
    assert_eq!(balances(app, &oak.seller).await, (0, 0, 0));

    // Then one board comes back: the commission on the board (450) comes
    // back from the platform, the other 4050 from oak's available balance,
    // which has nothing left.
    return_one_board(app, &buyer, &oak.seller, &paid).await;
    posted(app, "refund:%", 1).await;
    assert_eq!(balances(app, &oak.seller).await, (0, -4050, 0));
    assert_eq!(
        ledger_balance(app, "seller_available", Some("oak")).await,
        -4050
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 900 - 450);

    // Below zero, nothing can be withdrawn: not the minimum, not less.
    for amount in [WITHDRAWAL_MIN_MINOR, WITHDRAWAL_MIN_MINOR - 1, 1] {
        let refused = problem(
            withdraw(app, &oak.seller, amount, None).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(fields(&refused), ["amount_minor"], "{amount}: {refused}");
    }

    // Two more boards delivered: while they are held, pending money does
    // not make up for it ...
    let again = market.shopper(&[(oak, 2)]).await;
    let again = checkout_and_pay(app, stripe, &again.token).await;
    deliver(app, &oak.seller, &part_of(&again, "oak")).await;
    posted(app, "earning:%", 2).await;
    assert_eq!(balances(app, &oak.seller).await, (8599, -4050, 0));
    let refused = problem(
        withdraw(app, &oak.seller, WITHDRAWAL_MIN_MINOR, None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&refused), ["amount_minor"]);
    // ... once released they net the debt: 8599 - 4050 = 4549 available.
    end_holds(app).await;
    assert_eq!(balances(app, &oak.seller).await, (0, 4549, 0));
    assert_eq!(
        ledger_balance(app, "seller_available", Some("oak")).await,
        4549
    );
    let too_big = problem(
        withdraw(app, &oak.seller, 4550, None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&too_big), ["amount_minor"]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM withdrawals").await,
        1,
        "only the first one was ever made"
    );
    json_of(
        withdraw(app, &oak.seller, 4549, None).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(balances(app, &oak.seller).await, (0, 0, 4549));
    assert_ledger_balances(app).await;
    market.close().await;
}

/// The full account an admin is shown to pay withdrawal `id` (the read is
/// kept in the audit log).
async fn to_pay(app: &App, admin: &str, id: &str) -> Value {
    json_of(
        call(
            app,
            admin,
            Method::GET,
            &format!("/admin/withdrawals/{id}?reason=paying%20it"),
            json!({}),
        )
        .await,
        StatusCode::OK,
    )
    .await
}

/// The "withdrawal paid" mails to `to`, once there are `n` of them (other
/// mails, such as a new paid order, may say "paid" too).
async fn paid_mails(to: &str, n: usize) -> Vec<Mail> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let found: Vec<Mail> = mails_about(to, "paid", 0)
            .await
            .into_iter()
            .filter(|m| m.subject.starts_with("Withdrawal of") && m.subject.ends_with(" paid"))
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} withdrawal-paid mail(s) to {to}; got {found:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_open_withdrawal_is_paid_to_the_account_it_was_requested_to() {
    let market = Market::open().await;
    earned(&market).await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;
    let oak_email = seller_email(app, "oak").await;

    // Oak asks for 5000 to Layla Oak's account ending 3000 ...
    let first = json_of(
        withdraw(app, &oak.seller, 5000, None).await,
        StatusCode::CREATED,
    )
    .await;
    let first_id = first["id"].as_str().unwrap();
    assert_eq!(
        (first["holder_name"].as_str(), first["iban_last4"].as_str()),
        (Some("Layla Oak"), Some("3000"))
    );
    // ... then the payout details change to another holder and IBAN.
    let other = json!({"holder_name": "Mallory Taker", "iban": "GB82 WEST 1234 5698 7654 32"});
    let changed = json_of(
        call(
            app,
            &oak.seller,
            Method::PUT,
            "/seller/payout-details",
            other,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(changed["iban_masked"], "GB** **** **** 5432");
    // The shop's owner hears of the change (the first set-up was no change).
    let told = mails_about(&oak_email, "payout account", 1).await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].text.contains("GB** **** **** 5432"),
        "{}",
        told[0].text
    );
    assert!(
        told[0]
            .text
            .contains("still paid to the account it was requested to"),
        "{}",
        told[0].text
    );

    // The open withdrawal is still paid where it was asked to be paid.
    let shown = to_pay(app, &root, first_id).await;
    assert_eq!(shown["iban"], "DE89370400440532013000", "{shown}");
    assert_eq!(shown["holder_name"], "Layla Oak", "{shown}");
    assert_eq!(shown["withdrawal"]["iban_last4"], "3000", "{shown}");
    // The schema will not let an open withdrawal lose its account.
    let stripped = sqlx::query(
        "UPDATE withdrawals SET iban_ciphertext = NULL, iban_nonce = NULL WHERE status = 'requested'",
    )
    .execute(&app.db.pool)
    .await;
    assert!(stripped.is_err(), "an open withdrawal without an account");

    decide(app, &root, first_id, "approve", "sent by SEPA").await;
    let paid = paid_mails(&oak_email, 1).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert!(paid[0].text.contains("ending 3000"), "{}", paid[0].text);
    assert!(!paid[0].text.contains("5432"), "{}", paid[0].text);

    // A withdrawal asked for after the change goes to the new account.
    let second = json_of(
        withdraw(app, &oak.seller, 3599, None).await,
        StatusCode::CREATED,
    )
    .await;
    let second_id = second["id"].as_str().unwrap();
    assert_eq!(
        (
            second["holder_name"].as_str(),
            second["iban_last4"].as_str()
        ),
        (Some("Mallory Taker"), Some("5432"))
    );
    let shown = to_pay(app, &root, second_id).await;
    assert_eq!(shown["iban"], "GB82WEST12345698765432", "{shown}");
    assert_eq!(shown["holder_name"], "Mallory Taker", "{shown}");
    // The first one, paid, still names the account it went to.
    let again = to_pay(app, &root, first_id).await;
    assert_eq!(again["iban"], "DE89370400440532013000", "{again}");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'withdrawal.read_payout_details' AND reason = 'paying it'"
        )
        .await,
        3
    );
    decide(app, &root, second_id, "approve", "sent by SEPA").await;
    let paid = paid_mails(&oak_email, 2).await;
    assert_eq!(paid.len(), 2, "{paid:?}");
    assert!(
        paid.iter().any(|m| m.text.contains("ending 5432")),
        "{paid:?}"
    );
    assert_ledger_balances(app).await;
    market.close().await;
}

/// A shop suspended after it asked for a withdrawal is not paid out: the
/// approval is refused (nothing leaves the ledger); the request can be
/// turned down, its money back in the balance, or paid once reinstated.
#[tokio::test]
async fn a_suspended_shops_open_withdrawal_is_not_paid() {
    let market = Market::open().await;
    earned(&market).await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;
    let w = json_of(
        withdraw(app, &oak.seller, 5000, None).await,
        StatusCode::CREATED,
    )
    .await;
    let id = w["id"].as_str().unwrap();
    let suspend = json!({"reason": "chargebacks under review"});
    let resp = call(
        app,
        &root,
        Method::POST,
        "/admin/shops/oak/suspend",
        suspend,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let approve = format!("/admin/withdrawals/{id}/approve");
    let why = json!({"reason": "paid by transfer"});
    let refused = call(app, &root, Method::POST, &approve, why.clone()).await;
    let refused = problem(refused, StatusCode::CONFLICT).await;
    assert_eq!(fields(&refused), ["status"]);
    assert!(refused.to_string().contains("suspended"), "{refused}");
    let payouts = "SELECT count(*) FROM ledger_transactions WHERE kind = 'withdrawal_paid'";
    assert_eq!(count(&app.db.pool, payouts).await, 0, "nothing paid out");

    let resp = call(
        app,
        &root,
        Method::POST,
        "/admin/shops/oak/unsuspend",
        json!({"reason": "cleared"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let paid = json_of(
        call(app, &root, Method::POST, &approve, why).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(paid["status"], "paid");
    market.close().await;
}

#[tokio::test]
async fn a_withdrawal_is_not_paid_while_a_refund_since_leaves_the_seller_owing() {
    let market = Market::open().await;
    let (buyer, paid) = earned(&market).await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;

    // Oak asks for everything (8599); before an admin pays it, one board
    // comes back out of the available balance, which had nothing left.
    let id = &asked_all_then_owing(app, &buyer, &oak.seller, &paid).await;
    assert_eq!(balances(app, &oak.seller).await, (0, -4050, 8599));

    // Paying it now would send out 8599 while oak owes 4050: refused, and
    // nothing changes.
    let path = format!("/admin/withdrawals/{id}/approve");
    let refused = problem(
        call(app, &root, Method::POST, &path, json!({"reason": "sent"})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&refused), ["status"], "{refused}");
    assert!(refused.to_string().contains("owes 4050"), "{refused}");
    assert_eq!(balances(app, &oak.seller).await, (0, -4050, 8599));
    assert_eq!(ledger_balance(app, "payouts", None).await, 0);
    let status: String = sqlx::query_scalar("SELECT status FROM withdrawals")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "requested");

    // Turning it down is still allowed: the money nets the debt.
    let rejected = decide(app, &root, id, "reject", "a refund came in since").await;
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(balances(app, &oak.seller).await, (0, 8599 - 4050, 0));
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn what_an_approved_refund_will_take_cannot_be_withdrawn_before_it_is_posted() {
    // Everything but the payments worker of the pipeline; one of its own
    // runs until the earning is released, then stops, so the refund
    // approved afterwards waits (`requested`) as if Stripe were slow.
    let market = Market::without_payments().await;
    let payments = payments_through(&market.app, &market.pipeline, &market.stripe.url);
    let (buyer, paid) = earned(&market).await;
    payments.stop().await;
    let Market { app, oak, .. } = &market;
    return_one_board(app, &buyer, &oak.seller, &paid).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM refunds WHERE status = 'requested'"
        )
        .await,
        1
    );
    // Not posted yet: the ledger still shows 8599 available ...
    assert_eq!(balances(app, &oak.seller).await, (0, 8599, 0));

    // ... but 4050 of it goes back with that refund: 4549 may be withdrawn.
    let too_much = problem(
        withdraw(app, &oak.seller, 4550, None).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&too_much), ["amount_minor"]);
    assert!(too_much.to_string().contains("(4549)"), "{too_much}");
    let w = json_of(
        withdraw(app, &oak.seller, 4549, None).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(balances(app, &oak.seller).await, (0, 4050, 4549));
    // And it can be paid: what is left covers the refund on its way.
    let root = market.admin_token().await;
    let paid_out = decide(app, &root, w["id"].as_str().unwrap(), "approve", "sent").await;
    assert_eq!(paid_out["status"], "paid");
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn a_release_waits_for_a_withdrawal_being_decided_so_owed_and_balance_agree() {
    // Everything but the payments worker; one of its own runs until the
    // second order is paid, then stops, so that order's refund waits.
    let market = Market::without_payments().await;
    let payments = payments_through(&market.app, &market.pipeline, &market.stripe.url);
    let (buyer, paid) = earned(&market).await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;

    // Oak asks for all 8599; then a board of that order comes back out of
    // the available balance: -4050.
    let id = &asked_all_then_owing(app, &buyer, &oak.seller, &paid).await;
    // A second order of one board, delivered: 4549 pending, still held.
    let (second_buyer, second) = market.paid(&[(oak, 1)]).await;
    let part = part_of(&second, "oak");
    deliver(app, &oak.seller, &part).await;
    posted(app, "earning:%", 2).await;
    payments.stop().await;
    // Its board comes back too; the refund waits for Stripe. Once the
    // earning is released, 4050 of it will come out of the available balance.
    return_one_board(app, &second_buyer, &oak.seller, &second).await;
    counted(
        app,
        "the refund waiting",
        "SELECT count(*) FROM refunds WHERE status = 'requested'",
        1,
    )
    .await;
    assert_eq!(balances(app, &oak.seller).await, (4549, -4050, 8599));

    // An admin's approval, up to its first read: the account locked as the
    // approval locks it, and nothing owed yet (the earning is not released).
    let (shop, currency): (Uuid, String) =
        sqlx::query_as("SELECT shop_id, currency FROM withdrawals WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let mut approval = app.db.pool.begin().await.unwrap();
    ledger::lock_available(&mut approval, shop, &currency)
        .await
        .unwrap();
    let owed = ledger::waiting_refunds_owed(&mut approval, shop, &currency)
        .await
        .unwrap();
    assert_eq!(owed, 0);

    // The sweep's release of the second order, meanwhile, waits for it.
    let mut sweep = app.db.pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *sweep)
        .await
        .unwrap();
    let seller_order = Uuid::parse_str(&part).unwrap();
    let release = tokio::spawn(async move {
        let done = postings::release(&mut sweep, seller_order).await.unwrap();
        sweep.commit().await.unwrap();
        done
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Had it gone through, the read below would find its 4549 (499
        // available) beside nothing owed: oak paid out while it owes 4050.
        assert!(
            !release.is_finished(),
            "the release went through while a withdrawal was being decided"
        );
        let waiting: Option<bool> = sqlx::query_scalar(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if waiting == Some(true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the release neither waited nor finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let balance = ledger::seller_balance(&mut approval, shop, &currency)
        .await
        .unwrap();
    assert_eq!(
        balance.available_minor, -4050,
        "the balance of the same moment as what is owed"
    );
    approval.rollback().await.unwrap();
    assert!(release.await.unwrap(), "released once the lock is let go");

    // Now both count the release: 499 available, 4050 of it owed to the
    // waiting refund. The approval is refused: oak owes 3551.
    assert_eq!(balances(app, &oak.seller).await, (0, 499, 8599));
    let mut conn = app.db.pool.acquire().await.unwrap();
    assert_eq!(
        ledger::waiting_refunds_owed(&mut conn, shop, &currency)
            .await
            .unwrap(),
        4050
    );
    let path = format!("/admin/withdrawals/{id}/approve");
    let refused = problem(
        call(app, &root, Method::POST, &path, json!({"reason": "sent"})).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(refused.to_string().contains("owes 3551"), "{refused}");
    assert_eq!(ledger_balance(app, "payouts", None).await, 0);
    assert_ledger_balances(app).await;
    market.close().await;
}
