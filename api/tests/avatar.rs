//! Avatar uploads: recognised by content, size-limited, re-encoded, served.

mod common;

use std::io::Cursor;

use common::{App, IMAGE_MAX, fields, problem, signed_in, spawn_app};
use reqwest::{StatusCode, multipart};
use serde_json::Value;
use souk_testkit::amqp_url;

async fn upload(
    app: &App,
    token: &str,
    bytes: Vec<u8>,
    name: &str,
    mime: &str,
) -> reqwest::Response {
    let part = multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str(mime)
        .unwrap();
    app.http
        .put(format!("{}/api/v1/me/avatar", app.base))
        .bearer_auth(token)
        .multipart(multipart::Form::new().part("avatar", part))
        .send()
        .await
        .unwrap()
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn a_good_image_is_stored_resized_re_encoded_and_served() {
    let app = spawn_app(&amqp_url()).await;
    let token = signed_in(&app, None).await;
    let sent = jpeg(1200, 600);
    // Named and typed as something else: the content decides.
    let resp = upload(
        &app,
        &token,
        sent.clone(),
        "holiday.gif",
        "application/octet-stream",
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let account: Value = resp.json().await.unwrap();
    let url = account["avatar_url"]
        .as_str()
        .expect("an avatar url")
        .to_string();

    let served = app
        .http
        .get(format!("{}{url}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.headers()["content-type"], "image/png");
    assert_eq!(served.headers()["x-content-type-options"], "nosniff");
    let bytes = served.bytes().await.unwrap();
    assert_ne!(bytes.as_ref(), sent.as_slice(), "never served as sent");
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (512, 256),
        "resized to fit 512x512"
    );

    // A new upload replaces it; the old file is gone.
    let second: Value = upload(&app, &token, jpeg(64, 64), "a.jpg", "image/jpeg")
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(second["avatar_url"], account["avatar_url"]);
    assert_eq!(
        app.http
            .get(format!("{}{url}", app.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn text_renamed_to_png_and_oversized_uploads_are_refused_and_nothing_is_stored() {
    let app = spawn_app(&amqp_url()).await;
    let token = signed_in(&app, None).await;
    let fake = upload(
        &app,
        &token,
        b"just some text, honest".to_vec(),
        "photo.png",
        "image/png",
    )
    .await;
    let body = problem(fake, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&body), ["avatar"]);

    let huge = vec![0u8; IMAGE_MAX * 4];
    problem(
        upload(&app, &token, huge, "big.jpg", "image/jpeg").await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;

    let avatar: Option<String> = sqlx::query_scalar("SELECT avatar FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(avatar, None);
    let me: Value = app
        .get_with_token("/api/v1/me", &token)
        .await
        .json()
        .await
        .unwrap();
    assert!(me.get("avatar_url").is_none());
}

#[tokio::test]
async fn only_names_the_api_made_are_served() {
    let app = spawn_app(&amqp_url()).await;
    let user = uuid::Uuid::now_v7();
    for file in ["..%2F..%2Fetc%2Fpasswd", "x.png", "passwd"] {
        let resp = app.get(&format!("/api/v1/avatars/{user}/{file}")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{file}");
    }
}
