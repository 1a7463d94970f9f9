//! Manifest files: arbitrary text through the parser (YAML documents, `v1 List`s, every kind
//! kproxy reads) and the converter (Services, EndpointSlices and the Node to the model that
//! every dataplane programs). Nothing may panic, and a complete state must be printable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((mut store, ingress)) = kproxy_fuzz::load(text) else {
        return;
    };
    if store.is_ready() {
        let snapshot = store.snapshot();
        // Walks every Service port and endpoint of the converted state.
        let _ = kproxy::app::services_table(&snapshot.desired);
    }
    let class = kproxy::ingress::routes::ClassConfig { class: "kproxy".into() };
    let _ = kproxy::ingress::routes::build_routes(&ingress, &class, &|k| kproxy_fuzz::lookup(&store, k));
});
