//! kproxy as a library: every module of the `kproxy` binary, so that the fuzz targets under
//! `fuzz/` (and any other harness) can drive the parsers and pure converters directly. The
//! binary (`src/main.rs`) is a thin user of this crate; nothing here is a stable API.
#![deny(unsafe_code)]
// The modules were written as a binary's private modules; lints about the shape of a public
// API (which this crate does not offer) would only ask for methods nobody calls.
#![allow(clippy::len_without_is_empty)]

pub mod api_client;
pub mod app;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod healthcheck;
pub mod ingress;
pub mod metrics;
pub mod model;
pub mod node_setup;
pub mod sync;
pub mod watch;
