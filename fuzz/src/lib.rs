//! What the fuzz targets share: manifest text turned into the store and the Ingress objects,
//! the way the `--manifests` source and the route builder see them.

use std::collections::BTreeMap;

use kproxy::ingress::objects::{IngressObject, IngressObjects};
use kproxy::ingress::routes::ServiceLookup;
use kproxy::model::store::Store;
use kproxy::model::ServiceKey;
use kproxy::watch::allocate::{allocate, Taken};
use kproxy::watch::manifests::{parse_manifest, Object};

/// The node every target pretends to run on.
pub const NODE: &str = "n1";

/// Parses `text` as one manifest file and loads what it defines, as the manifest source's
/// first read does: Services get cluster IPs and node ports, every kind is listed.
pub fn load(text: &str) -> Option<(Store, IngressObjects)> {
    let objects = parse_manifest(text).ok()?;
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut nodes = Vec::new();
    let mut ingress = IngressObjects::default();
    let (mut ings, mut classes, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
    for (_, object) in objects {
        match object {
            Object::Service(s) => services.push(s),
            Object::EndpointSlice(s) => slices.push(s),
            Object::Node(n) => nodes.push(n),
            Object::Ingress(i) => ings.push(i),
            Object::IngressClass(c) => classes.push(c),
            Object::Secret(s) => secrets.push(s),
            // Parsed (so the parser is fuzzed) but not built: the Gateway route builder is
            // not one of these targets.
            Object::Gateway(_) => {}
        }
    }
    let range = "10.96.0.0/16".parse().ok()?;
    allocate(&mut services, &range, &mut Taken::default(), &BTreeMap::new());
    let mut store = Store::new(NODE);
    store.replace_services(services.iter());
    store.replace_slices(slices.iter());
    match nodes.iter().find(|n| n.metadata.name.as_deref() == Some(NODE)) {
        Some(node) => store.apply_node(node),
        None => store.apply_node(&k8s_openapi::api::core::v1::Node::default()),
    };
    k8s_openapi::api::networking::v1::Ingress::replace(&mut ingress, &ings);
    k8s_openapi::api::networking::v1::IngressClass::replace(&mut ingress, &classes);
    k8s_openapi::api::core::v1::Secret::replace(&mut ingress, &secrets);
    Some((store, ingress))
}

/// What the Ingress route builder asks the store about a Service (as the controller does).
pub fn lookup(store: &Store, key: &ServiceKey) -> ServiceLookup {
    if let Some(name) = store.external_name(key) {
        return ServiceLookup::ExternalName(name.to_string());
    }
    match store.service_state(key) {
        Some(state) => ServiceLookup::Ports(state),
        None => ServiceLookup::Missing,
    }
}
