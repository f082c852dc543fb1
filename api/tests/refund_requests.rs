//! Refund requests: opened by the customer on a shipped or delivered line
//! (with photos), decided by the seller or an admin; an approval reaches
//! Stripe and the ledger once, and never more than was paid goes back.

mod common;

use common::{
    App, admin,
    catalog::{call, json_of},
    fields,
    orders::{
        Market, PIPELINE_WAIT, ask_refund, assert_ledger_balances, checkout_and_pay, counted,
        deliver, ledger_balance, mails_about, part_of, posted, refunds_at_stripe, seller_email,
        sent, sent_of, settled_mails, stock, wait_for,
    },
    problem,
    stripe_proxy::{PaymentsTask, StripeProxy, payments_through},
    token_for,
};
use reqwest::{Method, StatusCode, multipart};
use serde_json::{Value, json};
use souk_shared::{
    contracts::{RefundRequested, RefundSucceeded},
    envelope::Envelope,
    outbox,
};
use souk_testkit::{count, wait_until};
use uuid::Uuid;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn line<'a>(order: &'a Value, title: &str) -> &'a Value {
    order["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["title"] == title)
        .unwrap()
}

/// The seller approves `request`, putting the item back in stock or not.
async fn seller_approves(app: &App, seller: &str, request: &Value, restock: bool) -> Value {
    let approve = format!("/seller/refund-requests/{}/approve", id(request));
    let body = json!({ "restock": restock });
    json_of(
        call(app, seller, Method::POST, &approve, body).await,
        StatusCode::OK,
    )
    .await
}

/// The seller turns `request` down with `reason`.
async fn seller_rejects(app: &App, seller: &str, request: &Value, reason: &str) -> Value {
    let reject = format!("/seller/refund-requests/{}/reject", id(request));
    json_of(
        call(
            app,
            seller,
            Method::POST,
            &reject,
            json!({ "reason": reason }),
        )
        .await,
        StatusCode::OK,
    )
    .await
}

/// A tiny valid PNG.
fn png() -> Vec<u8> {
    let mut bytes = Vec::new();
    let img = image_rgb();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

fn image_rgb() -> image::DynamicImage {
    image::DynamicImage::new_rgb8(8, 8)
}

#[tokio::test]
async fn an_approved_refund_reaches_stripe_and_the_ledger_once() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let (buyer, paid) = market.paid(&[(oak, 2)]).await;
    let order = id(&paid);
    let board = line(&paid, "Walnut board");

    // Not before it ships.
    let path = format!("/orders/{order}/refund-requests");
    let early = json!({"line_id": board["id"], "quantity": 1, "reason": "changed my mind"});
    problem(
        call(app, &buyer.token, Method::POST, &path, early.clone()).await,
        StatusCode::CONFLICT,
    )
    .await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    posted(app, "earning:%", 1).await;

    let too_many = json!({"line_id": board["id"], "quantity": 3, "reason": "cracked"});
    let too_many = problem(
        call(app, &buyer.token, Method::POST, &path, too_many).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(fields(&too_many), ["quantity"]);
    let body = json!({"line_id": board["id"], "quantity": 1, "reason": "one arrived cracked"});
    let request = json_of(
        call(app, &buyer.token, Method::POST, &path, body).await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        (request["status"].as_str(), request["amount_minor"].as_i64()),
        (Some("open"), Some(4500))
    );
    let again = json!({"line_id": board["id"], "quantity": 1, "reason": "the other too"});
    problem(
        call(app, &buyer.token, Method::POST, &path, again).await,
        StatusCode::CONFLICT,
    )
    .await;

    // A photo, seen by the customer and the seller, no one else.
    let form = multipart::Form::new().part(
        "image",
        multipart::Part::bytes(png()).file_name("crack.png"),
    );
    let with_photo = app
        .http
        .post(format!(
            "{}/api/v1/refund-requests/{}/images",
            app.base,
            id(&request)
        ))
        .bearer_auth(&buyer.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let with_photo = json_of(with_photo, StatusCode::CREATED).await;
    let url = format!(
        "{}{}",
        app.base,
        with_photo["image_urls"][0].as_str().unwrap()
    );
    for (token, status) in [
        (&buyer.token, StatusCode::OK),
        (&oak.seller, StatusCode::OK),
        (&market.tea.seller, StatusCode::NOT_FOUND),
    ] {
        let resp = app.http.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(resp.status(), status);
        if status == StatusCode::OK {
            assert_eq!(resp.headers()["cache-control"], "private, max-age=3600");
        }
    }
    mails_about(&seller_email(app, "oak").await, "Refund request", 1).await;

    // Another shop cannot decide it; a customer is no seller.
    let approve = format!("/seller/refund-requests/{}/approve", id(&request));
    problem(
        call(
            app,
            &market.tea.seller,
            Method::POST,
            &approve,
            json!({"restock": true}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        call(
            app,
            &buyer.token,
            Method::POST,
            &approve,
            json!({"restock": true}),
        )
        .await,
        StatusCode::FORBIDDEN,
    )
    .await;

    let approved = json_of(
        call(
            app,
            &oak.seller,
            Method::POST,
            &approve,
            json!({"restock": true, "note": "sorry about that"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(approved["status"], "approved");
    let twice = call(
        app,
        &oak.seller,
        Method::POST,
        &approve,
        json!({"restock": true}),
    )
    .await;
    problem(twice, StatusCode::CONFLICT).await;

    // Stripe refunds 4500 once; the ledger takes it back from oak and the commission once.
    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    refunds_at_stripe(stripe, &intent, 1, "the refund at Stripe").await;
    assert_eq!(stripe.refunds_of(&intent).await[0]["amount"], 4500);
    posted(app, "refund:%", 1).await;
    assert_eq!(refund_postings(app).await, 1);
    // Earned 8599 (pending); 4500 of items back: 4050 from oak, the 450 of
    // commission on them from the platform.
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        8599 - 4050
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 900 - 450);
    assert_eq!(
        stock(app, &oak.variant).await,
        (4, 0),
        "one back on the shelf"
    );
    let seen = json_of(
        call(app, &buyer.token, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(seen[0]["refund_status"], "succeeded");
    mails_about(&buyer.email, "Refund request approved", 1).await;
    mails_about(&buyer.email, "Refund of", 1).await;
    mails_about(&seller_email(app, "oak").await, "Refund of 45.00", 1).await;

    // The refund's messages delivered again (copies with ids of their own):
    // Stripe is not asked twice and the ledger posts it once.
    let refund: Uuid = sqlx::query_scalar("SELECT id FROM refunds")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    for _ in 0..3 {
        let asked = Envelope::new(&RefundRequested { refund_id: refund }, "again");
        outbox::enqueue(&mut tx, &asked).await.unwrap();
        let done = Envelope::new(&RefundSucceeded { refund_id: refund }, "again");
        outbox::enqueue(&mut tx, &done).await.unwrap();
    }
    tx.commit().await.unwrap();
    let copies = "SELECT count(*) FROM processed_messages WHERE message_id IN
                    (SELECT id FROM outbox WHERE correlation_id = 'again')";
    wait_until("every copy handled", PIPELINE_WAIT, || async {
        count(&app.db.pool, copies).await >= 6
    })
    .await;
    assert_eq!(stripe.refunds_of(&intent).await.len(), 1);
    assert_eq!(refund_postings(app).await, 1);
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        8599 - 4050
    );
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn an_admin_can_overturn_a_sellers_rejection_with_a_reason() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let oak_part = part_of(&paid, "oak");
    deliver(app, &oak.seller, &oak_part).await;
    let board = line(&paid, "Walnut board");
    let body = json!({"line_id": board["id"], "reason": "arrived cracked"});
    let path = format!("/orders/{}/refund-requests", id(&paid));
    let request = json_of(
        call(app, &buyer.token, Method::POST, &path, body).await,
        StatusCode::CREATED,
    )
    .await;
    seller_rejects(app, &oak.seller, &request, "it left the workshop whole").await;
    // The seller cannot change its mind by approving now.
    let approve = format!("/seller/refund-requests/{}/approve", id(&request));
    let again = call(
        app,
        &oak.seller,
        Method::POST,
        &approve,
        json!({"restock": false}),
    )
    .await;
    problem(again, StatusCode::CONFLICT).await;

    // The customer disputes it; an admin steps in, and must say why.
    let step_in = format!("/admin/refund-requests/{}/approve", id(&request));
    let silent = call(
        app,
        &root,
        Method::POST,
        &step_in,
        json!({"restock": false}),
    )
    .await;
    assert_eq!(
        fields(&problem(silent, StatusCode::UNPROCESSABLE_ENTITY).await),
        ["note"]
    );
    let why = json!({"restock": false, "note": "the carrier's photos show the crack"});
    let overturned = json_of(
        call(app, &root, Method::POST, &step_in, why.clone()).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(overturned["status"], "approved");
    let twice = call(app, &root, Method::POST, &step_in, why).await;
    problem(twice, StatusCode::CONFLICT).await;
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM audit_log WHERE action = 'refund_request.approved'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(reason, "the carrier's photos show the crack");
    let intent = paid["payment"]["payment_intent_id"]
        .as_str()
        .map(str::to_string);
    let intent = match intent {
        Some(intent) => intent,
        None => sqlx::query_scalar("SELECT payment_intent_id FROM orders")
            .fetch_one(&app.db.pool)
            .await
            .unwrap(),
    };
    refunds_at_stripe(stripe, &intent, 1, "the refund at Stripe").await;
    assert_eq!(stripe.refunds_of(&intent).await[0]["amount"], 4500);
    mails_about(&seller_email(app, "oak").await, "Refund request", 2).await;
    mails_about(&buyer.email, "Refund request approved", 1).await;
    market.close().await;
}

/// After a seller's rejection the customer may ask again; if the seller
/// approves the second request, an admin overturning the first must not
/// refund (or restock) the same units twice.
#[tokio::test]
async fn a_line_is_refunded_once_however_its_requests_are_decided() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    let board = line(&paid, "Walnut board");
    let path = format!("/orders/{}/refund-requests", id(&paid));
    let ask = json!({"line_id": board["id"], "reason": "arrived cracked"});
    let first = json_of(
        call(app, &buyer.token, Method::POST, &path, ask.clone()).await,
        StatusCode::CREATED,
    )
    .await;

    // Another shop's seller sees none of oak's requests.
    for (token, total) in [(&oak.seller, 1), (&tea.seller, 0)] {
        let listed = json_of(
            call(
                app,
                token,
                Method::GET,
                "/seller/refund-requests",
                json!({}),
            )
            .await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(listed["total"], total, "{listed}");
    }

    seller_rejects(app, &oak.seller, &first, "left whole").await;
    let second = json_of(
        call(app, &buyer.token, Method::POST, &path, ask).await,
        StatusCode::CREATED,
    )
    .await;
    seller_approves(app, &oak.seller, &second, true).await;
    let (on_hand, _) = stock(app, &oak.variant).await;

    let step_in = format!("/admin/refund-requests/{}/approve", id(&first));
    let overturn = json!({"restock": true, "note": "the carrier's photos show the crack"});
    let refused = problem(
        call(app, &root, Method::POST, &step_in, overturn).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&refused), ["quantity"]);
    let mine = json_of(
        call(app, &buyer.token, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    let statuses: Vec<_> = mine
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (id(r), r["status"].as_str().unwrap().to_string()))
        .collect();
    assert!(
        statuses.contains(&(id(&first), "rejected".into())),
        "{mine}"
    );
    assert!(
        statuses.contains(&(id(&second), "approved".into())),
        "{mine}"
    );

    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    refunds_at_stripe(stripe, &intent, 1, "the refund at Stripe").await;
    posted(app, "refund:%", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(stripe.refunds_of(&intent).await.len(), 1);
    assert_eq!(refund_postings(app).await, 1);
    assert_eq!(stock(app, &oak.variant).await.0, on_hand);
    assert_ledger_balances(app).await;
    market.close().await;
}

/// Three boards paid 12,500 after a 10.00 shop coupon: refunded one at a
/// time, they give back 4,166 + 4,167 + 4,167, the whole line, not three
/// times a rounded-down third (12,498).
#[tokio::test]
async fn one_unit_at_a_time_a_line_gives_back_exactly_what_was_paid() {
    let market = Market::open().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let coupon = json!({"code": "OAK10", "amount_off_minor": 1000});
    json_of(
        call(app, &oak.seller, Method::POST, "/seller/coupons", coupon).await,
        StatusCode::CREATED,
    )
    .await;
    let buyer = market.shopper(&[(oak, 3)]).await;
    let applied = json!({"code": "OAK10"});
    json_of(
        call(app, &buyer.token, Method::PUT, "/cart/coupon", applied).await,
        StatusCode::OK,
    )
    .await;
    let paid = checkout_and_pay(app, stripe, &buyer.token).await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    let board = line(&paid, "Walnut board");
    let path = format!("/orders/{}/refund-requests", id(&paid));
    let mut amounts = vec![];
    for _ in 0..3 {
        let ask = json!({"line_id": board["id"], "quantity": 1, "reason": "warped"});
        let asked = json_of(
            call(app, &buyer.token, Method::POST, &path, ask).await,
            StatusCode::CREATED,
        )
        .await;
        amounts.push(asked["amount_minor"].as_i64().unwrap());
        seller_approves(app, &oak.seller, &asked, false).await;
    }
    assert_eq!(amounts, [4166, 4167, 4167]);
    assert_eq!(
        amounts.iter().sum::<i64>(),
        3 * 4500 - 1000,
        "the line's whole amount"
    );
    posted(app, "refund:%", 3).await;
    assert_ledger_balances(app).await;
    market.close().await;
}

#[tokio::test]
async fn a_seller_cancel_after_a_partial_refund_gives_back_only_the_rest() {
    let market = Market::open().await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let oak_part = part_of(&paid, "oak");
    let path = format!("/admin/seller-orders/{oak_part}/refund");
    let goodwill = json!({"amount_minor": 999, "reason": "late, goodwill"});
    let refund = |body: Value| {
        app.http
            .post(format!("{}/api/v1{path}", app.base))
            .bearer_auth(&root)
            .header("Idempotency-Key", "goodwill-1")
            .json(&body)
            .send()
    };
    // Retried with the same key: one refund; the key with another refund: refused.
    for _ in 0..2 {
        let resp = refund(goodwill.clone()).await.unwrap();
        json_of(resp, StatusCode::OK).await;
    }
    let other = refund(json!({"amount_minor": 500, "reason": "late, goodwill"}))
        .await
        .unwrap();
    let other = problem(other, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&other), ["Idempotency-Key"]);
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM refunds").await, 1);
    // At once, whether or not Stripe has confirmed that refund yet.
    let path = format!("/seller/orders/{oak_part}/cancel");
    let cancel = json!({"reason": "cannot make it after all"});
    json_of(
        call(app, &oak.seller, Method::POST, &path, cancel).await,
        StatusCode::OK,
    )
    .await;
    counted(
        app,
        "both refunds through",
        "SELECT count(*) FROM refunds WHERE status = 'succeeded'",
        2,
    )
    .await;
    let total = paid["total_minor"].as_i64().unwrap();
    let amounts: Vec<i64> =
        sqlx::query_scalar("SELECT amount_minor FROM refunds ORDER BY created_at")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(amounts, vec![999, total - 999], "all of it, once");
    let refunded = wait_for(app, &buyer.token, &id(&paid), "refunded").await;
    assert_eq!(refunded["refunded_minor"], total);
    market.close().await;
}

#[tokio::test]
async fn a_refund_above_what_was_paid_is_refused() {
    let market = Market::open().await;
    let Market {
        app,
        stripe,
        oak,
        tea,
        ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1), (tea, 1)]).await;
    let oak_part = part_of(&paid, "oak");
    deliver(app, &oak.seller, &oak_part).await;

    // Oak's part was 4500 + 499: an admin may refund part, never more.
    let path = format!("/admin/seller-orders/{oak_part}/refund");
    let over = json!({"amount_minor": 5000, "reason": "goodwill"});
    let over = problem(
        call(app, &root, Method::POST, &path, over).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&over), ["amount_minor"]);
    let part = json!({"amount_minor": 999, "reason": "late delivery, goodwill"});
    json_of(
        call(app, &root, Method::POST, &path, part).await,
        StatusCode::OK,
    )
    .await;
    // 4999 - 999 = 4000 left: the board's request (4500) no longer fits.
    let board = line(&paid, "Walnut board");
    let body = json!({"line_id": board["id"], "reason": "cracked"});
    let request = json_of(
        call(
            app,
            &buyer.token,
            Method::POST,
            &format!("/orders/{}/refund-requests", id(&paid)),
            body,
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let approve = format!("/admin/refund-requests/{}/approve", id(&request));
    let refused = problem(
        call(
            app,
            &root,
            Method::POST,
            &approve,
            json!({"restock": false, "note": "the customer is right"}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(fields(&refused), ["amount_minor"]);
    assert_eq!(
        count(&app.db.pool, "SELECT count(*) FROM refunds").await,
        1,
        "nothing more was written"
    );
    // The admin rejects it instead (kept in the audit log); the seller hears of it.
    let reject = format!("/admin/refund-requests/{}/reject", id(&request));
    let rejected = json_of(
        call(
            app,
            &root,
            Method::POST,
            &reject,
            json!({"reason": "already compensated"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (rejected["status"].as_str(), rejected["decided_by"].as_str()),
        (Some("rejected"), Some("admin"))
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM audit_log WHERE action = 'refund_request.rejected'"
        )
        .await,
        1
    );
    mails_about(
        &seller_email(app, "oak").await,
        "Refund request rejected",
        1,
    )
    .await;
    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    refunds_at_stripe(stripe, &intent, 1, "the goodwill refund at Stripe").await;
    assert_eq!(stripe.refunds_of(&intent).await[0]["amount"], 999);

    // Another customer cannot ask on this order.
    let other = market.shopper(&[]).await;
    let body = json!({"line_id": board["id"], "reason": "mine now"});
    let path = format!("/orders/{}/refund-requests", id(&paid));
    problem(
        call(app, &other.token, Method::POST, &path, body).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    problem(
        call(app, &other.token, Method::GET, &path, json!({})).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    market.close().await;
}

/// Refund transactions posted to the ledger.
async fn refund_postings(app: &App) -> i64 {
    count(
        &app.db.pool,
        "SELECT count(*) FROM ledger_transactions WHERE kind = 'refund'",
    )
    .await
}

/// What Stripe answers the refunds [`refusing_refunds`] asks for.
const REFUSED: &str = "Charge ch_souk has already been disputed.";

/// Everything but the payments worker, which runs on its own and talks to
/// Stripe through a proxy that refuses every refund with [`REFUSED`] (a
/// 400, as for a charge already disputed) until told to pass them through.
async fn refusing_refunds() -> (Market, StripeProxy, PaymentsTask) {
    let market = Market::without_payments().await;
    let proxy = StripeProxy::start(&market.stripe.url).await;
    proxy.refuse(Method::POST, "/v1/refunds", REFUSED);
    let payments = payments_through(&market.app, &market.pipeline, &proxy.url);
    (market, proxy, payments)
}

/// Stripe refusing a refund (a 400, as for a charge already disputed): the
/// refund fails with Stripe's reason and nothing else pretends it went
/// through. The payment is flagged for admins; the customer hears it is
/// delayed; the seller of that part is mailed and told in-app; admins are
/// told in-app; no refund is posted to the ledger.
#[tokio::test]
async fn a_refund_stripe_refuses_fails_visibly_and_posts_nothing() {
    let (market, proxy, payments) = refusing_refunds().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = admin(app).await;
    let root_id: Uuid = sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(&root)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let seller_id: Uuid = sqlx::query_scalar("SELECT owner_id FROM shops WHERE slug = 'oak'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let order = id(&paid);
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    posted(app, "earning:%", 1).await;
    let board = line(&paid, "Walnut board");
    let path = format!("/orders/{order}/refund-requests");
    let body = json!({"line_id": board["id"], "reason": "arrived cracked"});
    let request = json_of(
        call(app, &buyer.token, Method::POST, &path, body).await,
        StatusCode::CREATED,
    )
    .await;
    let approved = seller_approves(app, &oak.seller, &request, false).await;
    assert_eq!(approved["status"], "approved");

    counted(
        app,
        "the refund to fail",
        "SELECT count(*) FROM refunds WHERE status <> 'requested'",
        1,
    )
    .await;
    let mails = settled_mails(app).await;

    // The refund: failed, with Stripe's own words; asked once (a refusal is
    // not retried) and never made at Stripe.
    let (status, failure): (String, Option<String>) =
        sqlx::query_as("SELECT status, failure FROM refunds")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), failure.as_deref()),
        ("failed", Some(REFUSED))
    );
    assert_eq!(count(&app.db.pool, "SELECT count(*) FROM refunds").await, 1);
    assert_eq!(proxy.seen_to(Method::POST, "/v1/refunds").len(), 1);
    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stripe.refunds_of(&intent).await.len(), 0);
    let seen = json_of(
        call(app, &buyer.token, Method::GET, &path, json!({})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(seen[0]["refund_status"], "failed", "{seen}");

    // The payment is flagged for admins, with the reason.
    let flags: Vec<Option<String>> = sqlx::query_scalar("SELECT flagged_reason FROM payments")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(flags.len(), 1);
    let flag = flags[0].clone().expect("the payment is flagged");
    assert!(flag.contains(REFUSED), "{flag}");

    // Who hears of it: the customer (mail and in-app), the seller of that
    // part (mail and in-app), the admins (in-app); each once.
    assert_eq!(sent(&mails, &buyer.email, "refund_failed"), 1, "{mails:?}");
    assert_eq!(sent_of(&mails, "refund_failed"), 1, "{mails:?}");
    let oak_email = seller_email(app, "oak").await;
    assert_eq!(
        sent(&mails, &oak_email, "seller_refund_failed"),
        1,
        "{mails:?}"
    );
    assert_eq!(sent_of(&mails, "seller_refund_failed"), 1, "{mails:?}");
    for template in ["refund_issued", "seller_refund_issued"] {
        assert_eq!(sent_of(&mails, template), 0, "{mails:?}");
    }
    assert_eq!(mails_about(&buyer.email, "is delayed", 1).await.len(), 1);
    assert_eq!(mails_about(&oak_email, "is delayed", 1).await.len(), 1);
    let notices = |user: Uuid| async move {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'refund_failed'",
        )
        .bind(user)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        n
    };
    assert_eq!(notices(buyer.id).await, 1, "the customer's notice");
    assert_eq!(notices(seller_id).await, 1, "the seller's notice");
    assert_eq!(notices(root_id).await, 1, "the admin's notice");
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM notifications WHERE kind = 'refund_failed'"
        )
        .await,
        3
    );

    // Nothing came back out of the ledger: the earning stands, all balanced.
    assert_eq!(refund_postings(app).await, 0);
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM ledger_transactions WHERE reference LIKE 'refund:%'"
        )
        .await,
        0
    );
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        4549
    );
    assert_ledger_balances(app).await;
    let (refunded, status): (i64, String) =
        sqlx::query_as("SELECT refunded_minor, status FROM orders")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((refunded, status.as_str()), (0, "paid"));

    // Nothing went back, so the board is still the customer's to ask for:
    // the approved request whose refund failed no longer counts its unit.
    let again = json_of(
        call(
            app,
            &buyer.token,
            Method::POST,
            &path,
            json!({"line_id": board["id"], "reason": "arrived cracked, still"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        (again["quantity"].as_i64(), again["amount_minor"].as_i64()),
        (Some(1), Some(4500))
    );
    // The seller turns it down; an admin overturns that, now that Stripe
    // takes refunds again: the failed one took no unit of the line back.
    seller_rejects(app, &oak.seller, &again, "left whole").await;
    proxy.pass_through();
    let root_token = token_for(app, &root).await;
    let step_in = format!("/admin/refund-requests/{}/approve", id(&again));
    let overturn = json!({"restock": false, "note": "the carrier's photos show the crack"});
    json_of(
        call(app, &root_token, Method::POST, &step_in, overturn).await,
        StatusCode::OK,
    )
    .await;
    posted(app, "refund:%", 1).await;
    assert_eq!(stripe.refunds_of(&intent).await.len(), 1);
    // The board back, its 450 of commission with it: shipping stays oak's.
    assert_eq!(
        ledger_balance(app, "seller_pending", Some("oak")).await,
        499
    );
    assert_eq!(ledger_balance(app, "commission", None).await, 0);
    assert_ledger_balances(app).await;

    payments.stop().await;
    market.close().await;
}

/// A unit back on the shelf through an approved refund request is not put
/// back again when its seller order is later called off: 2 boards sold, 1
/// returned and restocked, the part moved back from shipped by an admin and
/// cancelled by its seller: the stock ends where it began, not one over.
#[tokio::test]
async fn a_unit_restocked_by_a_refund_request_is_not_restocked_again_on_cancel() {
    let market = Market::open().await;
    let Market { app, oak, .. } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 2)]).await;
    let part = part_of(&paid, "oak");
    let shipped = json!({"status": "shipped", "carrier": "Amana", "tracking_number": "AM1"});
    json_of(
        call(
            app,
            &oak.seller,
            Method::POST,
            &format!("/seller/orders/{part}/status"),
            shipped,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(stock(app, &oak.variant).await, (3, 0));
    let board = line(&paid, "Walnut board");
    let path = format!("/orders/{}/refund-requests", id(&paid));
    let ask = json!({"line_id": board["id"], "quantity": 1, "reason": "one was cracked"});
    let asked = json_of(
        call(app, &buyer.token, Method::POST, &path, ask).await,
        StatusCode::CREATED,
    )
    .await;
    seller_approves(app, &oak.seller, &asked, true).await;
    assert_eq!(stock(app, &oak.variant).await, (4, 0));

    let back = json!({"status": "processing", "reason": "the parcel never left the depot"});
    json_of(
        call(
            app,
            &root,
            Method::POST,
            &format!("/admin/seller-orders/{part}/status"),
            back,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let cancel = json!({"reason": "cannot send the other board"});
    json_of(
        call(
            app,
            &oak.seller,
            Method::POST,
            &format!("/seller/orders/{part}/cancel"),
            cancel,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    counted(
        app,
        "the part's stock returned",
        "SELECT count(*) FROM seller_orders WHERE stock_returned_at IS NOT NULL",
        1,
    )
    .await;
    assert_eq!(
        stock(app, &oak.variant).await,
        (5, 0),
        "each unit back once"
    );
    market.close().await;
}

/// Two boards returned, their request approved with a restock: on the
/// shelf at once. Stripe then refuses the refund, so the customer asks
/// again for the same two boards and that is approved with a restock too:
/// the boards are already back, so the stock rises once (two boards, not
/// four that could be sold), and the second approval says it restocked none.
#[tokio::test]
async fn units_restocked_before_their_refund_failed_are_not_restocked_again() {
    let (market, proxy, payments) = refusing_refunds().await;
    let Market {
        app, stripe, oak, ..
    } = &market;
    let (buyer, paid) = market.paid(&[(oak, 2)]).await;
    deliver(app, &oak.seller, &part_of(&paid, "oak")).await;
    let (sold, _) = stock(app, &oak.variant).await;

    let first = ask_refund(app, &buyer.token, &paid, "Walnut board", 2, "both cracked").await;
    let restocked = seller_approves(app, &oak.seller, &first, true).await;
    assert_eq!(stock(app, &oak.variant).await, (sold + 2, 0));
    counted(
        app,
        "the refund to fail",
        "SELECT count(*) FROM refunds WHERE status = 'failed'",
        1,
    )
    .await;

    // No money went back: the two boards may be asked for again.
    let again = ask_refund(app, &buyer.token, &paid, "Walnut board", 2, "still cracked").await;
    proxy.pass_through();
    let approved = seller_approves(app, &oak.seller, &again, true).await;
    assert_eq!(
        stock(app, &oak.variant).await,
        (sold + 2, 0),
        "the two boards went back in stock once"
    );
    // Each approval tells what it put back.
    assert_eq!(restocked["restocked_units"], 2, "{restocked}");
    assert_eq!(
        (
            approved["restock"].as_bool(),
            approved["restocked_units"].as_i64()
        ),
        (Some(true), Some(0)),
        "{approved}"
    );
    assert_eq!(
        count(
            &app.db.pool,
            "SELECT count(*) FROM stock_adjustments WHERE reason LIKE 'returned: refund request %'"
        )
        .await,
        1
    );
    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    refunds_at_stripe(stripe, &intent, 1, "the second refund at Stripe").await;
    posted(app, "refund:%", 1).await;
    assert_eq!(stock(app, &oak.variant).await, (sold + 2, 0));
    assert_ledger_balances(app).await;

    payments.stop().await;
    market.close().await;
}

/// An admin refunds part of a seller order; before Stripe answers, its
/// seller cancels the part, and the cancel asks only for the rest (the
/// first counted as on its way). Then Stripe refuses the first: what it
/// was is still owed for a cancelled part, so it is asked for again, once,
/// with a key of its own, and the customer ends with all of it back and
/// the part `refunded`, nothing flagged.
///
/// The order of events is pinned, not raced: the payments worker is
/// stopped while the first refund is asked for, and its Stripe refusal is
/// held from being written (a row for its message, uncommitted, in the
/// consumer's processed-messages table) until the cancel is in.
#[tokio::test]
async fn a_refund_refused_after_a_cancel_counted_it_is_asked_for_again() {
    let market = Market::without_payments().await;
    let proxy = StripeProxy::start(&market.stripe.url).await;
    let payments = payments_through(&market.app, &market.pipeline, &proxy.url);
    let Market {
        app, stripe, oak, ..
    } = &market;
    let root = market.admin_token().await;
    let (buyer, paid) = market.paid(&[(oak, 1)]).await;
    let order = id(&paid);
    let part = part_of(&paid, "oak");
    let total: i64 = sqlx::query_scalar("SELECT total_minor FROM seller_orders WHERE id = $1")
        .bind(Uuid::parse_str(&part).unwrap())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    payments.stop().await;

    // The admin's 500: asked for, waiting for the payments worker.
    let refund = format!("/admin/seller-orders/{part}/refund");
    let goodwill = json!({"amount_minor": 500, "reason": "late, goodwill"});
    json_of(
        call(app, &root, Method::POST, &refund, goodwill).await,
        StatusCode::OK,
    )
    .await;
    let first: Uuid = sqlx::query_scalar("SELECT id FROM refunds")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let message: Uuid = sqlx::query_scalar(
        "SELECT id FROM outbox WHERE routing_key = 'payment.refund_requested'
            AND envelope #>> '{payload,refund_id}' = $1",
    )
    .bind(first.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let mut pin = app.db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO processed_messages (consumer, message_id, attempt) VALUES ('payments', $1, 0)",
    )
    .bind(message)
    .execute(&mut *pin)
    .await
    .unwrap();
    proxy.refuse(Method::POST, "/v1/refunds", REFUSED);
    let payments = payments_through(app, &market.pipeline, &proxy.url);
    wait_until(
        "Stripe to refuse the first refund",
        PIPELINE_WAIT,
        || async { !proxy.seen_to(Method::POST, "/v1/refunds").is_empty() },
    )
    .await;
    proxy.pass_through();

    // The seller cancels: the rest is asked for, and goes through.
    let cancel = format!("/seller/orders/{part}/cancel");
    json_of(
        call(
            app,
            &oak.seller,
            Method::POST,
            &cancel,
            json!({"reason": "cannot make it after all"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    counted(
        app,
        "the rest refunded",
        "SELECT count(*) FROM refunds WHERE status = 'succeeded'",
        1,
    )
    .await;
    let status: String = sqlx::query_scalar("SELECT status FROM refunds WHERE id = $1")
        .bind(first)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "requested", "the cancel came before the refusal");

    // Now the refusal is written.
    pin.rollback().await.unwrap();
    counted(
        app,
        "the part refunded",
        "SELECT count(*) FROM seller_orders WHERE status = 'refunded'",
        1,
    )
    .await;
    let refunds: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        // (The replacement's row was written in a transaction older than the
        // cancel's: `created_at` does not order them.)
        "SELECT amount_minor, status, idempotency_key FROM refunds
          ORDER BY idempotency_key IS NOT NULL, status",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let again = format!("replaces:{first}");
    assert_eq!(
        refunds,
        vec![
            (500, "failed".to_string(), None),
            (total - 500, "succeeded".to_string(), None),
            (500, "succeeded".to_string(), Some(again)),
        ],
        "the refused 500 asked for again, once"
    );
    // At Stripe: all of it back, in two refunds; three asks, each its own key.
    let intent: String = sqlx::query_scalar("SELECT payment_intent_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let at_stripe: i64 = stripe
        .refunds_of(&intent)
        .await
        .iter()
        .map(|r| r["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(at_stripe, total);
    let asks = proxy.seen_to(Method::POST, "/v1/refunds");
    let mut keys: Vec<_> = asks.iter().map(|s| s.idempotency_key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!((asks.len(), keys.len()), (3, 3), "{asks:?}");
    let refunded = wait_for(app, &buyer.token, &order, "refunded").await;
    assert_eq!(refunded["refunded_minor"], total);

    // Nothing left for an admin: the payment is not flagged; the customer
    // hears of each refund that went through, never of a delay.
    let flag: Option<String> = sqlx::query_scalar("SELECT flagged_reason FROM payments")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(flag, None);
    let mails = settled_mails(app).await;
    assert_eq!(sent(&mails, &buyer.email, "refund_issued"), 2, "{mails:?}");
    assert_eq!(sent_of(&mails, "refund_failed"), 0, "{mails:?}");
    posted(app, "refund:%", 2).await;
    assert_ledger_balances(app).await;

    payments.stop().await;
    market.close().await;
}
