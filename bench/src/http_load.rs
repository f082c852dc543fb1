//! A closed-loop HTTP load generator: `connections` keep-alive HTTP/1.1
//! connections, each sending its next request as soon as the last answer
//! is read, for a fixed time. Written on hyper's connection API directly
//! (no pool, no per-request allocation of a client) so that the generator,
//! which shares the machine with what it measures, takes as little CPU as
//! it can.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;

use crate::stats::Latencies;

/// What a run of the generator saw.
pub struct Outcome {
    pub latencies: Latencies,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// The address and `Host` of an `http://host:port` base URL.
pub async fn target(base: &str) -> anyhow::Result<(SocketAddr, String)> {
    let url = reqwest::Url::parse(base).with_context(|| format!("not a URL: {base}"))?;
    anyhow::ensure!(url.scheme() == "http", "only http:// is supported: {base}");
    let host = url.host_str().context("no host")?.to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .with_context(|| format!("{host} does not resolve"))?;
    Ok((addr, format!("{host}:{port}")))
}

/// GETs `path()` over `connections` connections for `duration`; every 2xx
/// (or 304) whose body was read counts, anything else is an error.
pub async fn run(
    base: &str,
    connections: usize,
    duration: Duration,
    path: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<Outcome> {
    let (addr, host) = target(base).await?;
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (host, path) = (host.clone(), path.clone());
            tokio::spawn(async move { connection(addr, host, deadline, path).await })
        })
        .collect();
    let (mut all, mut errors, mut first_error) = (Vec::new(), 0, None);
    for task in tasks {
        let (times, failed, error) = task.await?;
        all.extend(times);
        errors += failed;
        first_error = first_error.or(error);
    }
    Ok(Outcome {
        latencies: Latencies::new(all),
        errors,
        first_error,
        elapsed: started.elapsed(),
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One connection's loop: its latencies, its error count and first error.
async fn connection(
    addr: SocketAddr,
    host: String,
    deadline: Instant,
    path: Arc<dyn Fn() -> String + Send + Sync>,
) -> (Vec<Duration>, u64, Option<String>) {
    let (mut times, mut errors, mut first) = (Vec::with_capacity(1 << 14), 0, None);
    let mut sender: Option<Sender> = None;
    while Instant::now() < deadline {
        let mut fail = |e: String| {
            errors += 1;
            first.get_or_insert(e);
        };
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    fail(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let request = Request::get(path())
            .header(header::HOST, host.as_str())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let t = Instant::now();
        match s.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                match response.into_body().collect().await {
                    Ok(_) if status.is_success() || status.as_u16() == 304 => {
                        times.push(t.elapsed())
                    }
                    Ok(_) => fail(format!("status {status}")),
                    Err(e) => {
                        fail(format!("body: {e}"));
                        sender = None;
                    }
                }
            }
            Err(e) => {
                fail(format!("request: {e}"));
                sender = None;
            }
        }
    }
    (times, errors, first)
}
