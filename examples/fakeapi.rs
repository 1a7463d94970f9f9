//! The integration tests' fake Kubernetes API server as a process of its own, for the
//! benchmarks (`scripts/bench-nftables.sh`): kproxy watches it as it would a real API server
//! (lists with pagination, watches from a resourceVersion, bookmarks).
//!
//! usage: fakeapi FILE.yaml...   (run inside the namespace kproxy runs in)
//!
//! Serves the objects of the files on 127.0.0.1, prints the server's URL, then reads one path
//! per line on stdin and applies the objects of that file (watches get their events at once),
//! answering `applied RESOURCEVERSION` when they are stored.

#[path = "../integration/fakeapi.rs"]
#[allow(clippy::all)]
mod fakeapi;

use std::io::{BufRead, Write};

use serde_json::Value;

fn objects(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split("\n---")
        .filter(|doc| !doc.trim().is_empty() && doc.trim() != "---")
        .map(|doc| serde_yaml::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let server = runtime
        .block_on(fakeapi::FakeApiServer::start_on(listener))
        .expect("fake API server");
    for path in std::env::args().skip(1) {
        for object in objects(&path) {
            server.apply(object).unwrap_or_else(|e| panic!("{path}: {e:?}"));
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.url()).expect("stdout");
    out.flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let path = line.expect("stdin");
        for object in objects(path.trim()) {
            server.apply(object).unwrap_or_else(|e| panic!("{path}: {e:?}"));
        }
        writeln!(out, "applied {}", server.resource_version()).expect("stdout");
        out.flush().expect("stdout");
    }
}
