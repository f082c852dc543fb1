# Multi-stage build: one image holds every Souk binary; each compose service
# runs a different one.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends mold && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p souk-api -p souk-workers --bins \
 && mkdir -p /out \
 && cp target/release/souk-api target/release/outbox-relay target/release/mailer \
       target/release/order-splitter target/release/stock-reserver target/release/payments \
       target/release/settlement target/release/replenisher \
       target/release/souk-admin /out/

FROM debian:bookworm-slim
# The uploads directory exists, owned by souk: an empty named volume mounted
# there (docker-compose.yml) takes this ownership; made by Docker at mount
# time it would be root's, and every upload would fail.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 souk \
 && mkdir -p /data/uploads && chown souk:souk /data/uploads
COPY --from=build /out/ /usr/local/bin/
USER souk
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 8080 9100
CMD ["souk-api"]
