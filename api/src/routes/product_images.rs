//! Product photos: several per product, ordered, validated and re-encoded
//! like avatars (`crate::images`), managed by the product's seller only.

use axum::{
    Json,
    extract::{FromRequestParts, Multipart, Request, State},
    http::StatusCode,
    response::Response,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{Caller, Role, Seller},
    error::{ApiError, FieldError, Problem},
    extract::{Path, ValidJson, Validate},
    images::{self, Gallery},
    routes::products::{SellerProduct, load},
    state::AppState,
};

/// Served to anyone only while the storefront shows the product
/// (`catalog::VISIBLE`, its shop and the shop's owner looked up in the
/// image's own query: one statement per photo served).
const PHOTOS: Gallery = Gallery {
    table: "product_images",
    owner_column: "product_id",
    owner_table: "products",
    folder: "products",
    field: "image",
    size: 1600,
    max_images: 10,
    private: false,
    shown: &[souk_shared::catalog::VISIBLE_O],
};

/// The photos of a product the storefront does not show (a draft, one
/// withdrawn or hidden by moderation, one of a shop or seller suspended),
/// as its seller and admins still see them: never kept by shared caches.
const UNLISTED_PHOTOS: Gallery = Gallery {
    private: true,
    shown: &["true"],
    ..PHOTOS
};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductImage {
    pub id: Uuid,
    /// Where the storefront loads it from (relative to the API's origin).
    pub url: String,
}

/// Where [`serve`] answers for an image.
pub fn url(product: Uuid, file: &str) -> String {
    format!("/api/v1/product-images/{product}/{file}")
}

/// A product's images in order, with their URLs.
pub async fn of(pool: &sqlx::PgPool, product: Uuid) -> Result<Vec<ProductImage>, ApiError> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, file FROM product_images WHERE product_id = $1 ORDER BY position, id",
    )
    .bind(product)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, file)| ProductImage {
            id,
            url: url(product, &file),
        })
        .collect())
}

async fn owned_product(state: &AppState, seller: &Seller, product: Uuid) -> Result<(), ApiError> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM products WHERE id = $1 AND shop_id = $2")
            .bind(product)
            .bind(seller.shop_id)
            .fetch_optional(&state.pool)
            .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound)
}

/// Add a photo to a product of the seller's shop (multipart field `image`:
/// JPEG, PNG or WebP). It goes last; at most 10 per product.
#[utoipa::path(
    post, path = "/seller/products/{id}/images", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    request_body(content_type = "multipart/form-data", description = "field `image`: the photo"),
    responses(
        (status = 201, description = "the product with its images", body = SellerProduct),
        (status = 404, description = "no such product in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already 10 images", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "larger than IMAGE_MAX_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a JPEG, PNG or WebP image", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    seller: Seller,
    Path(product): Path<Uuid>,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<SellerProduct>), ApiError> {
    owned_product(&state, &seller, product).await?;
    PHOTOS.append(&state, product, &mut multipart).await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state.pool, &seller, product).await?),
    ))
}

/// Remove a photo from a product of the seller's shop.
#[utoipa::path(
    delete, path = "/seller/products/{id}/images/{image}", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("image" = Uuid, Path)),
    responses(
        (status = 204, description = "removed"),
        (status = 404, description = "no such image of a product in this shop", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    seller: Seller,
    Path((product, image)): Path<(Uuid, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let file: Option<String> = sqlx::query_scalar(
        "DELETE FROM product_images i USING products p
          WHERE i.id = $1 AND i.product_id = $2 AND p.id = i.product_id AND p.shop_id = $3
         RETURNING i.file",
    )
    .bind(image)
    .bind(product)
    .bind(seller.shop_id)
    .fetch_optional(&state.pool)
    .await?;
    let file = file.ok_or(ApiError::NotFound)?;
    images::discard(&state, &PHOTOS.key(product, &file)).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageOrder {
    /// Every image of the product, in the order to show them.
    pub image_ids: Vec<Uuid>,
}

impl Validate for ImageOrder {
    fn validate(&self) -> Vec<FieldError> {
        let mut ids = self.image_ids.clone();
        ids.sort();
        ids.dedup();
        if ids.len() != self.image_ids.len() {
            vec![FieldError::new("image_ids", "must not repeat an image")]
        } else {
            vec![]
        }
    }
}

/// Put a product's photos in a new order.
#[utoipa::path(
    put, path = "/seller/products/{id}/images/order", tag = "seller", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body = ImageOrder,
    responses(
        (status = 200, description = "the product with its images in the new order", body = SellerProduct),
        (status = 404, description = "no such product in this shop", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not exactly the product's images", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reorder(
    State(state): State<AppState>,
    seller: Seller,
    Path(product): Path<Uuid>,
    ValidJson(body): ValidJson<ImageOrder>,
) -> Result<Json<SellerProduct>, ApiError> {
    owned_product(&state, &seller, product).await?;
    let mut tx = state.pool.begin().await?;
    let mut current: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM product_images WHERE product_id = $1 FOR NO KEY UPDATE")
            .bind(product)
            .fetch_all(&mut *tx)
            .await?;
    let mut wanted = body.image_ids.clone();
    current.sort();
    wanted.sort();
    if current != wanted {
        return Err(ApiError::Validation(vec![FieldError::new(
            "image_ids",
            "must list exactly this product's images",
        )]));
    }
    sqlx::query(
        "UPDATE product_images i SET position = o.position - 1
           FROM unnest($2::uuid[]) WITH ORDINALITY AS o(id, position)
          WHERE i.id = o.id AND i.product_id = $1",
    )
    .bind(product)
    .bind(&body.image_ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(load(&state.pool, &seller, product).await?))
}

/// A product photo: to anyone while the storefront shows the product;
/// otherwise only to its seller and admins.
#[utoipa::path(
    get, path = "/product-images/{product}/{file}", tag = "catalog",
    params(("product" = Uuid, Path), ("file" = String, Path)),
    responses(
        (status = 200, description = "the PNG", content_type = "image/png"),
        (status = 404, description = "no such image, or one of a product the storefront does not show", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn serve(
    State(state): State<AppState>,
    Path((product, file)): Path<(Uuid, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    match PHOTOS.serve(&state, product, &file).await {
        Err(ApiError::NotFound) => {}
        served => return served,
    }
    // No such photo, or not on the storefront: a 404 to everyone else, as
    // its page is. Only here is the caller read (the storefront's own
    // images need no account), and an anonymous or unknown one is a 404,
    // not a 401.
    let (mut parts, _) = request.into_parts();
    let caller = Caller::from_request_parts(&mut parts, &state)
        .await
        .map_err(|_| ApiError::NotFound)?;
    let may_see = match caller.role {
        Role::Admin => true,
        Role::Seller => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM products p JOIN shops s ON s.id = p.shop_id
                             WHERE p.id = $1 AND s.owner_id = $2)",
            )
            .bind(product)
            .bind(caller.id)
            .fetch_one(&state.pool)
            .await?
        }
        Role::Customer => false,
    };
    if !may_see {
        return Err(ApiError::NotFound);
    }
    UNLISTED_PHOTOS.serve(&state, product, &file).await
}
