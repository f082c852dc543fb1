//! The ledger after a full run of orders, deliveries, refunds and
//! withdrawals: every transaction balances, every balance is what the money
//! rules say, and each event is posted once however often it is delivered
//! and however many settlement processes run.

mod common;

use common::{
    catalog::{call, json_of},
    orders::{
        Market, PIPELINE_WAIT, ask_refund, assert_ledger_balances, checkout_and_pay, deliver,
        end_holds, ledger_balance, part_of, posted, wait_for,
    },
};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use souk_shared::{contracts::SellerOrderDelivered, envelope::Envelope, outbox};
use souk_testkit::{count, wait_until};
use uuid::Uuid;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

async fn post(app: &common::App, token: &str, path: &str, body: Value) -> Value {
    json_of(
        call(app, token, Method::POST, path, body).await,
        StatusCode::OK,
    )
    .await
}

#[tokio::test]
async fn every_ledger_transaction_balances_after_orders_deliveries_refunds_and_withdrawals() {
    let mut market = Market::open().await;
    market.pipeline.run_settlement(&market.app); // a second settlement process, for good measure
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root = market.admin_token().await;

    // A: two boards and a teapot, both delivered; the holds end.
    let a = market.shopper(&[(oak, 2), (tea, 1)]).await;
    let paid = checkout_and_pay(app, stripe, &a.token).await;
    assert_eq!(paid["total_minor"], 9000 + 3000 + 2 * 499);
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    deliver(app, &tea.seller, &part_of(&paid, "tea")).await;
    posted(app, "earning:%", 2).await;
    let pending = json_of(
        call(app, &oak.seller, Method::GET, "/seller/balance", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        pending["pending_minor"],
        9499 - 900,
        "payout: items + shipping - 10 % of items"
    );
    assert_eq!(pending["available_minor"], 0);
    end_holds(app).await;

    // A returns one board: the refund comes back out of oak's balance and the commission.
    let request = ask_refund(app, &a.token, &paid, "Walnut board", 1, "arrived cracked").await;
    assert_eq!(request["amount_minor"], 4500);
    let path = format!("/seller/refund-requests/{}/approve", id(&request));
    post(app, &oak.seller, &path, json!({"restock": true})).await;
    posted(app, "refund:%", 1).await;

    // B: a teapot, cancelled by its seller before shipping (from clearing).
    let b = market.shopper(&[(tea, 1)]).await;
    let b_paid = checkout_and_pay(app, stripe, &b.token).await;
    let path = format!("/seller/orders/{}/cancel", part_of(&b_paid, "tea"));
    post(
        app,
        &tea.seller,
        &path,
        json!({"reason": "chipped in the workshop"}),
    )
    .await;
    // C: a board, cancelled by the customer once paid.
    let c = market.shopper(&[(oak, 1)]).await;
    let c_paid = checkout_and_pay(app, stripe, &c.token).await;
    post(
        app,
        &c.token,
        &format!("/orders/{}/cancel", id(&c_paid)),
        json!({}),
    )
    .await;
    wait_for(app, &c.token, &id(&c_paid), "refunded").await;
    posted(app, "refund:%", 3).await;

    // Oak takes 3000 out (paid); tea asks for 2000 (turned down).
    for (seller, iban) in [
        (&oak.seller, "DE89370400440532013000"),
        (&tea.seller, "GB82WEST12345698765432"),
    ] {
        let details = json!({"holder_name": "Shop Owner", "iban": iban});
        json_of(
            call(app, seller, Method::PUT, "/seller/payout-details", details).await,
            StatusCode::OK,
        )
        .await;
    }
    let w = call(
        app,
        &oak.seller,
        Method::POST,
        "/seller/withdrawals",
        json!({"amount_minor": 3000}),
    )
    .await;
    let w = json_of(w, StatusCode::CREATED).await;
    post(
        app,
        &root,
        &format!("/admin/withdrawals/{}/approve", id(&w)),
        json!({"reason": "paid by transfer"}),
    )
    .await;
    let w = call(
        app,
        &tea.seller,
        Method::POST,
        "/seller/withdrawals",
        json!({"amount_minor": 2000}),
    )
    .await;
    let w = json_of(w, StatusCode::CREATED).await;
    post(
        app,
        &root,
        &format!("/admin/withdrawals/{}/reject", id(&w)),
        json!({"reason": "account closed"}),
    )
    .await;

    // Every transaction balances, and so does the whole ledger.
    posted(app, "payment:%", 3).await;
    assert_ledger_balances(app).await;
    // The refund of one board (4500) comes out of the items: the platform
    // keeps 10 % of the 4500 of items left (450) and gives back the other
    // 450; seller 4050. Shipping takes no part in the commission.
    assert_eq!(
        ledger_balance(app, "seller_available", Some("oak")).await,
        8599 - 4050 - 3000
    );
    assert_eq!(
        ledger_balance(app, "seller_available", Some("tea")).await,
        3499 - 300
    );
    assert_eq!(ledger_balance(app, "seller_pending", None).await, 0);
    assert_eq!(ledger_balance(app, "seller_withdrawing", None).await, 0);
    assert_eq!(
        ledger_balance(app, "commission", None).await,
        900 + 300 - 450
    );
    assert_eq!(
        ledger_balance(app, "customer_funds", None).await,
        -(12998 + 3499 + 4999)
    );
    assert_eq!(
        ledger_balance(app, "refunds", None).await,
        4500 + 3499 + 4999
    );
    assert_eq!(ledger_balance(app, "payouts", None).await, 3000);
    assert_eq!(
        ledger_balance(app, "payments_clearing", None).await,
        0,
        "everything paid is earned or given back"
    );
    let oak_balance = json_of(
        call(app, &oak.seller, Method::GET, "/seller/balance", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            oak_balance["available_minor"].as_i64(),
            oak_balance["withdrawing_minor"].as_i64()
        ),
        (Some(1549), Some(0))
    );
    // The ledger is append-only: its rows can be neither changed nor
    // removed, one at a time or all at once; nor can the accounts they
    // belong to, nor the audit log of who decided what.
    let rows = |sql: &'static str| count(&app.db.pool, sql);
    let before = (
        rows("SELECT count(*) FROM ledger_entries").await,
        rows("SELECT count(*) FROM ledger_transactions").await,
        rows("SELECT count(*) FROM ledger_accounts").await,
        rows("SELECT count(*) FROM audit_log").await,
    );
    assert!(
        before.0 > 0 && before.1 > 0 && before.2 > 0 && before.3 > 0,
        "{before:?}"
    );
    for (sql, table) in [
        (
            "UPDATE ledger_entries SET amount_minor = amount_minor + 1",
            "ledger_entries",
        ),
        ("DELETE FROM ledger_entries", "ledger_entries"),
        ("TRUNCATE ledger_entries", "ledger_entries"),
        (
            "UPDATE ledger_transactions SET description = 'edited'",
            "ledger_transactions",
        ),
        ("DELETE FROM ledger_transactions", "ledger_transactions"),
        // CASCADE, so that no foreign key refuses it first.
        ("TRUNCATE ledger_transactions CASCADE", "ledger_"),
        (
            "UPDATE ledger_accounts SET kind = 'payouts' WHERE kind = 'commission'",
            "ledger_accounts",
        ),
        ("DELETE FROM audit_log", "audit_log"),
    ] {
        let error = refused(app, sql).await;
        assert!(
            error.contains("append-only") && error.contains(table),
            "{sql}: {error}"
        );
    }
    let after = (
        rows("SELECT count(*) FROM ledger_entries").await,
        rows("SELECT count(*) FROM ledger_transactions").await,
        rows("SELECT count(*) FROM ledger_accounts").await,
        rows("SELECT count(*) FROM audit_log").await,
    );
    assert_eq!(after, before);
    assert_eq!(
        ledger_balance(app, "commission", None).await,
        900 + 300 - 450
    );
    market.close().await;
}

/// Runs `sql` in a transaction of its own, rolled back whatever happens;
/// returns the database's refusal (and fails if there is none).
async fn refused(app: &common::App, sql: &'static str) -> String {
    let mut tx = app.db.pool.begin().await.unwrap();
    let result = sqlx::query(sql).execute(&mut *tx).await;
    tx.rollback().await.unwrap();
    match result {
        Ok(done) => panic!("{sql} went through ({} rows)", done.rows_affected()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn earnings_stay_pending_for_the_whole_hold_then_become_available() {
    // Short enough to wait out, long enough for many 200 ms sweeps inside it.
    const HOLD: Duration = Duration::from_secs(5);
    let market = Market::open_with_hold(HOLD).await;
    let Market { app, oak, .. } = &market;
    let (_, paid) = market.paid(&[(oak, 1)]).await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    posted(app, "earning:%", 1).await;

    // A second of sweeps (five or so) goes by: the earning is still held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (released, left): (bool, f64) = sqlx::query_as(
        "SELECT released_at IS NOT NULL, extract(epoch FROM available_at - now())::float8
           FROM seller_earnings",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(
        left > 0.0,
        "the hold ran out before it was checked ({left} s)"
    );
    assert!(!released, "released {left} s before its hold ends");
    let balance = json_of(
        call(app, &oak.seller, Method::GET, "/seller/balance", json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            balance["pending_minor"].as_i64(),
            balance["available_minor"].as_i64()
        ),
        (Some(4549), Some(0)),
        "{balance}"
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE kind = 'release'"
        )
        .await,
        0
    );

    // Once the hold is over the sweep releases it, by itself.
    wait_until("the earning released", PIPELINE_WAIT, || async {
        ledger_balance(app, "seller_available", Some("oak")).await == 4549
    })
    .await;
    assert_eq!(ledger_balance(app, "seller_pending", Some("oak")).await, 0);
    // The hold was the configured one, counted from the delivery (at the
    // latest from the earning's posting), and the release came after it.
    let (from_delivery, from_earning, after_hold): (f64, f64, bool) = sqlx::query_as(
        "SELECT extract(epoch FROM e.available_at - so.delivered_at)::float8,
                extract(epoch FROM e.available_at - t.created_at)::float8,
                r.created_at >= e.available_at AND e.released_at >= e.available_at
           FROM seller_earnings e
           JOIN seller_orders so ON so.id = e.seller_order_id
           JOIN ledger_transactions t ON t.reference = 'earning:' || e.seller_order_id
           JOIN ledger_transactions r ON r.reference = 'release:' || e.seller_order_id",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let hold = HOLD.as_secs_f64();
    assert!(
        from_delivery >= hold - 0.001 && from_earning <= hold + 0.001,
        "held for {from_delivery} s after delivery, {from_earning} s after posting"
    );
    assert!(after_hold, "released before the hold was over");
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn settlement_credits_each_delivery_once_under_redelivery_and_two_processes() {
    let mut market = Market::open().await;
    market.pipeline.run_settlement(&market.app);
    let Market { app, oak, .. } = &market;
    let (_, paid) = market.paid(&[(oak, 1)]).await;
    let part = part_of(&paid, "oak");
    deliver(app, &oak.seller, &part).await;
    posted(app, "earning:%", 1).await;

    // The delivery announced over and over (copies with ids of their own,
    // as an admin's corrections or a retrying producer would make).
    let part_id = Uuid::parse_str(&part).unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    for _ in 0..5 {
        let copy = Envelope::new(
            &SellerOrderDelivered {
                seller_order_id: part_id,
            },
            "redelivered",
        );
        outbox::enqueue(&mut tx, &copy).await.unwrap();
    }
    tx.commit().await.unwrap();
    wait_until("every copy handled", PIPELINE_WAIT, || async {
        count(
            &app.db.pool,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'settlement'",
        )
        .await
            >= 7
    })
    .await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE kind = 'earning'"
        )
        .await,
        1
    );
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        4500 + 499 - 450
    );

    // Both processes' sweeps and two more at once: released once.
    sqlx::query("UPDATE seller_earnings SET available_at = now() - interval '1 second'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (x, y) = tokio::join!(
        souk_workers::settlement::release_batch(&app.db.pool, 10),
        souk_workers::settlement::release_batch(&app.db.pool, 10),
    );
    x.unwrap();
    y.unwrap();
    end_holds(app).await;
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE kind = 'release'"
        )
        .await,
        1
    );
    assert_eq!(ledger_balance(app, "seller_pending", Some("oak")).await, 0);
    assert_eq!(
        ledger_balance(app, "seller_available", Some("oak")).await,
        4549
    );
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn a_refund_gives_back_only_the_commission_on_the_items_it_takes_back() {
    let market = Market::open().await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;
    // Two boards (9000 of items, 10 %: commission 900) and 499 shipping.
    let (buyer, paid) = market.paid(&[(oak, 2)]).await;
    let part = part_of(&paid, "oak");
    let status = format!("/seller/orders/{part}/status");
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM1"});
    post(app, &oak.seller, &status, shipped).await;

    // One board comes back while shipped: out of clearing, nothing earned yet.
    let request = ask_refund(
        app,
        &buyer.token,
        &paid,
        "Walnut board",
        1,
        "arrived cracked",
    )
    .await;
    let approve = format!("/seller/refund-requests/{}/approve", id(&request));
    post(app, &oak.seller, &approve, json!({"restock": false})).await;
    posted(app, "refund:%", 1).await;

    // Delivered: the earning nets that refund as the items it took back.
    // 4500 of items are left, so the platform keeps 450 (not 474, as a
    // share of the whole part with shipping would leave it), the seller
    // 4500 + 499 - 450 = 4549.
    post(app, &oak.seller, &status, json!({"status": "delivered"})).await;
    posted(app, "earning:%", 1).await;
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        4549
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 450);

    // The other board, then the shipping, given back by an admin: the board
    // takes the 450 of commission left, the shipping none of it.
    let refund = format!("/admin/seller-orders/{part}/refund");
    let board = json!({"amount_minor": 4500, "reason": "second board cracked too"});
    post(app, &root, &refund, board).await;
    posted(app, "refund:%", 2).await;
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        499
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 0);
    let shipping = json!({"amount_minor": 499, "reason": "shipping back too"});
    post(app, &root, &refund, shipping).await;
    posted(app, "refund:%", 3).await;
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        0,
        "the shipping, all the seller's, comes back from the seller alone"
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 0);
    assert_ledger_balances(app).await;
    market.close().await;
}
