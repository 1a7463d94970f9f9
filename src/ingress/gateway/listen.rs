//! Listening on the ports of Gateway listeners that the Ingress listeners do not already
//! serve: bound (on the Ingress listeners' address) when a Gateway first needs the port,
//! closed (after draining, like the Ingress listeners on shutdown) when none does any more,
//! each HTTPS port with its own certificates. Every proxy worker serves every such listener,
//! as it serves the Ingress ones (`controller::serve_gateway_listeners`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::ingress::objects::TlsSecret;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::build::Listen;
use crate::ingress::objects::ObjectKey;
use crate::ingress::routes::TlsBinding;
use crate::ingress::tls::{self, CertResolver};

/// One bound listener, as every worker serves it.
pub struct Bound {
    /// Unique across the process: a port closed and bound again is a new listener.
    pub id: u64,
    pub socket: std::net::TcpListener,
    pub tls: Option<TlsAcceptor>,
    /// Turns true when the listener closes.
    pub stop: watch::Receiver<bool>,
}

/// The listeners every worker must serve.
pub type Published = watch::Receiver<Arc<Vec<Arc<Bound>>>>;

struct Open {
    https: bool,
    resolver: Option<Arc<CertResolver>>,
    stop: watch::Sender<bool>,
    bound: Arc<Bound>,
}

/// Binds and closes the Gateway-only ports; owned by the route keeper.
pub struct GatewayListeners {
    ip: IpAddr,
    default_cert: Arc<CertifiedKey>,
    open: BTreeMap<u16, Open>,
    failed: BTreeMap<u16, String>,
    next_id: u64,
    published: watch::Sender<Arc<Vec<Arc<Bound>>>>,
}

impl GatewayListeners {
    /// Listeners on `ip` (the Ingress listeners' address); HTTPS names without a certificate
    /// get `default_cert`.
    pub fn new(ip: IpAddr, default_cert: Arc<CertifiedKey>) -> Self {
        GatewayListeners {
            ip,
            default_cert,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
            next_id: 0,
            published: watch::channel(Arc::new(Vec::new())).0,
        }
    }

    pub fn subscribe(&self) -> Published {
        self.published.subscribe()
    }

    /// Ports that could not be bound, with the error.
    pub fn failed(&self) -> &BTreeMap<u16, String> {
        &self.failed
    }

    /// Listens on exactly the ports of `listen` (trying again the ones that failed before),
    /// and installs each HTTPS port's certificates. Returns the certificate problems.
    pub fn sync(
        &mut self,
        listen: &Listen,
        certs: &BTreeMap<u16, Vec<TlsBinding>>,
        secrets: &BTreeMap<ObjectKey, TlsSecret>,
    ) -> Vec<String> {
        let mut changed = false;
        let closing: Vec<u16> = self
            .open
            .iter()
            .filter(|(port, o)| listen.get(port) != Some(&o.https))
            .map(|(port, _)| *port)
            .collect();
        for port in closing {
            if let Some(o) = self.open.remove(&port) {
                let _ = o.stop.send(true);
                tracing::info!(port, "Gateway listener closed");
                changed = true;
            }
        }
        self.failed.retain(|port, _| listen.contains_key(port));
        for (&port, &https) in listen {
            if self.open.contains_key(&port) {
                continue;
            }
            match self.bind(port, https) {
                Ok(open) => {
                    tracing::info!(port, https, "Gateway listener bound");
                    self.failed.remove(&port);
                    self.open.insert(port, open);
                    changed = true;
                }
                Err(e) => {
                    if self.failed.insert(port, e.to_string()).is_none() {
                        tracing::warn!(port, error = %e, "cannot listen for a Gateway listener");
                    }
                }
            }
        }
        let mut problems = Vec::new();
        for (port, o) in &self.open {
            if let Some(r) = &o.resolver {
                problems.extend(r.update(certs.get(port).map(Vec::as_slice).unwrap_or_default(), secrets));
            }
        }
        if changed {
            let all: Vec<Arc<Bound>> = self.open.values().map(|o| o.bound.clone()).collect();
            self.published.send_replace(Arc::new(all));
        }
        problems
    }

    fn bind(&mut self, port: u16, https: bool) -> std::io::Result<Open> {
        let socket = std::net::TcpListener::bind(SocketAddr::new(self.ip, port))?;
        socket.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux): no Nagle delay on
        // an answer written in more than one piece, and no setsockopt per connection.
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::TcpNoDelay, &true)?;
        let (resolver, tls) = if https {
            let resolver = Arc::new(CertResolver::new(self.default_cert.clone()));
            let config = tls::server_config(resolver.clone()).map_err(std::io::Error::other)?;
            (Some(resolver), Some(TlsAcceptor::from(config)))
        } else {
            (None, None)
        };
        let (stop, stop_rx) = watch::channel(false);
        self.next_id += 1;
        Ok(Open {
            https,
            resolver,
            stop,
            bound: Arc::new(Bound {
                id: self.next_id,
                socket,
                tls,
                stop: stop_rx,
            }),
        })
    }
}
