//! A TCP proxy a test can switch off, to take a dependency "down" without
//! stopping the shared service: while down it refuses new connections and
//! cuts the open ones.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

struct State {
    up: bool,
    /// Cancelled to cut every connection made while up.
    generation: CancellationToken,
}

impl Proxy {
    /// Forwards a local port to `target`; starts up or down as asked.
    pub async fn start(target: SocketAddr, up: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            up,
            generation: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        let (s, st) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => continue },
                };
                let (up, cut) = {
                    let g = s.lock().expect("lock");
                    (g.up, g.generation.clone())
                };
                if !up {
                    drop(client); // refused: closed at once
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut c, mut s) = (client, server);
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                    }
                });
            }
        });
        Self { addr, state, stop }
    }

    /// Brings the proxy up or takes it down (cutting open connections).
    pub fn set_up(&self, up: bool) {
        let mut g = self.state.lock().expect("lock");
        g.up = up;
        if !up {
            g.generation.cancel();
            g.generation = CancellationToken::new();
        }
    }

    /// The tests' AMQP URL ([`crate::amqp_url`]) routed through this proxy.
    pub fn amqp_url(&self) -> String {
        let url = crate::amqp_url();
        let (scheme_auth, rest) = url.split_once('@').expect("AMQP URL with credentials");
        let vhost = rest.split_once('/').map(|(_, v)| v).unwrap_or("%2f");
        format!("{scheme_auth}@{}/{vhost}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.set_up(false);
    }
}

/// A server that accepts connections and never says a word: a client talking
/// to it hangs until its own timeout, like one stuck behind a dead server.
pub struct Tarpit {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Tarpit {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let st = stop.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => if let Ok((socket, _)) = accepted { held.push(socket) },
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
