//! Sources of desired state: the Kubernetes API and manifest files. Both write into the same
//! store through [`crate::sync::SharedState::update`], so the rest of kproxy cannot tell them apart.

pub mod allocate;
pub mod backoff;
pub mod kube;
pub mod manifests;
