//! The embedded Ingress controller: route table (pure), L7 proxy (HTTP/1 by hand, HTTP/2 with
//! hyper), TLS (rustls SNI).
//!
//! Ingress objects come from the same sources as Services and are kept beside the L4 store
//! ([`crate::sync::SharedState`]) so that they never cause a kernel resync; the route table is
//! rebuilt from both whenever either changes.

pub mod annotations;
pub mod balance;
pub mod controller;
pub mod framing;
pub mod gateway;
pub mod h1;
pub mod objects;
pub mod pipe;
pub mod proxy;
pub mod routes;
pub mod status;
pub mod tls;
pub mod upstream;
