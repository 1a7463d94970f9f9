use super::*;
use crate::health::ProxyHealth;
use crate::model::store::Store;
use crate::model::ServiceKey;
use std::net::IpAddr;

/// A fresh directory for one test.
fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kproxy-manifests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn svc(name: &str, port: u16) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: NodePort, ports: [{{port: {port}}}]}}\n")
}

fn state() -> Arc<SharedState> {
    SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))))
}

fn source(dir: &Path) -> ManifestSource {
    ManifestSource::new(dir.to_path_buf(), "n1".into(), "10.96.0.0/12".parse().unwrap())
}

/// A Service's cluster IPs, node port and port, as the store holds it.
fn port_of(state: &SharedState, name: &str) -> Option<(Vec<IpAddr>, Option<u16>, u16)> {
    state.read(|store, _| {
        let st = store.service_state(&ServiceKey::new("default", name))?;
        let p = st.ports.first()?.port.clone();
        Some((p.cluster_ips.to_vec(), p.node_port, p.port))
    })
}

/// Writes `text` to `file` so that its stamp surely changes (size or a later mtime).
fn write(file: &Path, text: &str) {
    let before = std::fs::metadata(file).ok().and_then(|m| m.modified().ok());
    std::fs::write(file, text).unwrap();
    if let Some(before) = before {
        let after = std::fs::metadata(file).unwrap().modified().unwrap();
        if after <= before {
            let f = std::fs::File::options().write(true).open(file).unwrap();
            f.set_modified(before + Duration::from_secs(1)).unwrap();
        }
    }
}

const WALKTHROUGH: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
spec:
  replicas: 2
  selector:
    matchLabels:
      app: myapp
  template:
    metadata:
      labels:
        app: myapp
    spec:
      containers:
        - name: myapp
          image: nginx
          ports:
            - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: myapp-svc
spec:
  selector:
    app: myapp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 80
  type: ClusterIP
"#;

#[test]
fn walkthrough_manifests_load_and_get_a_cluster_ip() {
    let d = dir("walk");
    std::fs::write(d.join("all.yaml"), WALKTHROUGH).unwrap();
    let state = state();
    let done = source(&d).refresh(&state).unwrap().unwrap();
    assert_eq!((done.files_read, done.applied, done.problems.len()), (1, 1, 0));
    let (ips, _, port) = port_of(&state, "myapp-svc").expect("the Service is programmed");
    assert_eq!(port, 80);
    let range: IpNet = "10.96.0.0/12".parse().unwrap();
    assert!(range.contains(&ips[0]));
    // Deterministic: another node reading the same files picks the same address.
    let again = state_with(&d);
    assert_eq!(port_of(&again, "myapp-svc").unwrap().0, ips);
    std::fs::remove_dir_all(&d).ok();
}

fn state_with(d: &Path) -> Arc<SharedState> {
    let state = state();
    source(d).refresh(&state).unwrap();
    state
}

#[test]
fn allocation_avoids_taken_addresses_and_ports() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {type: NodePort, ports: [{port: 80}]}\n";
    let mut services: Vec<Service> = parse_manifest(text)
        .unwrap()
        .into_iter()
        .filter_map(|(_, o)| match o {
            Object::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    allocate(
        &mut services,
        &"10.96.0.0/30".parse().unwrap(),
        &mut Taken::default(),
        &BTreeMap::new(),
    );
    let a = services[0].spec.as_ref().unwrap();
    let b = services[1].spec.as_ref().unwrap();
    assert_eq!(a.cluster_ip.as_deref(), Some("10.96.0.2"));
    assert_eq!(b.cluster_ip, None, "a /30 has room for one Service only");
    let pa = a.ports.as_ref().unwrap()[0].node_port.unwrap();
    let pb = b.ports.as_ref().unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&pa) && pa != pb);
}

#[test]
fn only_changed_files_are_read_and_turned_into_changes() {
    let d = dir("source");
    let (a, b) = (d.join("a.yaml"), d.join("b.yaml"));
    std::fs::write(&a, svc("a", 80)).unwrap();
    std::fs::write(&b, svc("b", 80)).unwrap();
    let state = state();
    let mut source = source(&d);
    let first = source.refresh(&state).unwrap().unwrap();
    assert_eq!((first.files_read, first.applied, first.deleted), (2, 2, 0));
    assert_eq!(source.refresh(&state).unwrap(), None, "nothing changed");
    let (a_ips, a_node_port, _) = port_of(&state, "a").unwrap();

    // b's bytes go bad behind the source's back (same size, same modification time): it is
    // not read again while a changes, and b keeps being served.
    let stamp = std::fs::metadata(&b).unwrap().modified().unwrap();
    std::fs::write(&b, "!".repeat(svc("b", 80).len())).unwrap();
    let file = std::fs::File::options().write(true).open(&b).unwrap();
    file.set_modified(stamp).unwrap();
    write(&a, &svc("a", 8080));
    let second = source.refresh(&state).unwrap().unwrap();
    assert_eq!((second.files_read, second.applied, second.deleted), (1, 1, 0));
    assert_eq!(
        port_of(&state, "a"),
        Some((a_ips, a_node_port, 8080)),
        "an edited Service keeps its cluster IP and node port"
    );
    assert!(port_of(&state, "b").is_some());

    // A removed file's objects are deleted.
    std::fs::remove_file(&b).unwrap();
    let third = source.refresh(&state).unwrap().unwrap();
    assert_eq!(third.deleted, 1);
    assert_eq!(port_of(&state, "b"), None);
    assert!(port_of(&state, "a").is_some());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_broken_file_is_reported_once_keeps_its_objects_and_blocks_no_other_file() {
    let d = dir("broken");
    let (a, b, c) = (d.join("a.yaml"), d.join("b.yaml"), d.join("c.yaml"));
    std::fs::write(&a, svc("a", 80)).unwrap();
    std::fs::write(&b, svc("b", 80)).unwrap();
    let state = state();
    let mut source = source(&d);
    source.refresh(&state).unwrap();
    let b_before = port_of(&state, "b").unwrap();

    write(&b, &format!("{}---\nkind: [\n", svc("b", 81)));
    let broken = source.refresh(&state).unwrap().unwrap();
    assert_eq!(broken.problems.len(), 1, "{:?}", broken.problems);
    assert!(
        broken.problems[0].contains("b.yaml") && broken.problems[0].contains("document 2"),
        "{:?}",
        broken.problems
    );
    assert_eq!(broken.deleted, 0);
    assert_eq!(
        source.refresh(&state).unwrap(),
        None,
        "reported once, not at every poll"
    );
    assert_eq!(
        port_of(&state, "b"),
        Some(b_before.clone()),
        "b's last good copy keeps serving"
    );

    // Other files' changes still apply: an edit, and a new file.
    write(&a, &svc("a", 8080));
    std::fs::write(&c, svc("c", 80)).unwrap();
    let later = source.refresh(&state).unwrap().unwrap();
    assert!(later.problems.is_empty(), "{:?}", later.problems);
    assert_eq!(later.applied, 2);
    assert_eq!(port_of(&state, "a").unwrap().2, 8080);
    assert!(port_of(&state, "c").is_some());
    assert_eq!(port_of(&state, "b"), Some(b_before.clone()));

    // Fixed, b's new content applies.
    write(&b, &svc("b", 81));
    let fixed = source.refresh(&state).unwrap().unwrap();
    assert!(fixed.problems.is_empty(), "{:?}", fixed.problems);
    assert_eq!(port_of(&state, "b").unwrap().2, 81);
    assert_eq!(port_of(&state, "b").unwrap().0, b_before.0, "same cluster IP");

    // Broken again and then removed: what it last defined goes with it.
    write(&b, "kind: [\n");
    source.refresh(&state).unwrap();
    std::fs::remove_file(&b).unwrap();
    let removed = source.refresh(&state).unwrap().unwrap();
    assert_eq!(removed.deleted, 1);
    assert_eq!(port_of(&state, "b"), None);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_fresh_start_with_a_broken_file_programs_everything_else() {
    let d = dir("fresh");
    std::fs::write(d.join("a.yaml"), svc("a", 80)).unwrap();
    std::fs::write(d.join("b.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: b\n").unwrap();
    let state = state();
    let mut source = source(&d);
    let first = source.refresh(&state).unwrap().unwrap();
    assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
    assert!(first.problems[0].contains("b.yaml"), "{:?}", first.problems);
    assert!(state.is_ready(), "every kind counts as listed");
    assert!(state.snapshot().is_some(), "a sync can run");
    assert!(port_of(&state, "a").is_some());
    assert_eq!(port_of(&state, "b"), None);

    write(&d.join("b.yaml"), &svc("b", 80));
    source.refresh(&state).unwrap();
    assert!(port_of(&state, "b").is_some(), "b is programmed once it parses");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_duplicate_is_reported_once_the_first_file_wins_and_the_other_takes_over() {
    let d = dir("dup");
    let (a, b) = (d.join("a.yaml"), d.join("b.yaml"));
    let other = svc("other", 80);
    std::fs::write(&a, format!("{}---\n{other}", svc("web", 80))).unwrap();
    std::fs::write(&b, svc("web", 90)).unwrap();
    let state = state();
    let mut source = source(&d);
    let first = source.refresh(&state).unwrap().unwrap();
    assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
    let report = &first.problems[0];
    assert!(
        report.contains("Service default/web") && report.contains("a.yaml") && report.contains("b.yaml"),
        "{report}"
    );
    let (ips, node_port, port) = port_of(&state, "web").unwrap();
    assert_eq!(port, 80, "the first file in path order wins");

    // Editing the losing copy changes nothing programmed, and is not reported again.
    write(&b, &svc("web", 91));
    let edited = source.refresh(&state).unwrap().unwrap();
    assert!(edited.problems.is_empty(), "{:?}", edited.problems);
    assert_eq!(port_of(&state, "web").unwrap().2, 80);

    // The winning copy goes away: b's copy takes over, with the same cluster IP and node port.
    write(&a, &other);
    let took_over = source.refresh(&state).unwrap().unwrap();
    assert_eq!((took_over.applied, took_over.deleted), (2, 0), "{took_over:?}");
    assert_eq!(port_of(&state, "web"), Some((ips.clone(), node_port, 91)));

    // Back in a, it wins again (reported again: two copies once more).
    write(&a, &format!("{}---\n{other}", svc("web", 80)));
    let back = source.refresh(&state).unwrap().unwrap();
    assert_eq!(back.problems.len(), 1, "{:?}", back.problems);
    assert_eq!(port_of(&state, "web").unwrap().2, 80);

    // The losing copy goes away: nothing changes.
    std::fs::remove_file(&b).unwrap();
    let loser_gone = source.refresh(&state).unwrap().unwrap();
    assert_eq!(loser_gone.deleted, 0);
    assert_eq!(port_of(&state, "web"), Some((ips, node_port, 80)));

    // The last copy goes away: the Service is deleted.
    write(&a, &other);
    let last = source.refresh(&state).unwrap().unwrap();
    assert_eq!(last.deleted, 1);
    assert_eq!(port_of(&state, "web"), None);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_copy_whose_file_is_broken_cannot_take_over() {
    let d = dir("dup-broken");
    let (a, b) = (d.join("a.yaml"), d.join("b.yaml"));
    std::fs::write(&a, svc("web", 80)).unwrap();
    std::fs::write(&b, svc("web", 90)).unwrap();
    let state = state();
    let mut source = source(&d);
    source.refresh(&state).unwrap();
    write(&b, "kind: [\n");
    source.refresh(&state).unwrap();
    std::fs::remove_file(&a).unwrap();
    let done = source.refresh(&state).unwrap().unwrap();
    assert!(
        done.problems
            .iter()
            .any(|p| p.contains("b.yaml") && p.contains("cannot be read")),
        "{:?}",
        done.problems
    );
    assert_eq!(port_of(&state, "web"), None, "nothing readable defines it");
    write(&b, &svc("web", 90));
    source.refresh(&state).unwrap();
    assert_eq!(port_of(&state, "web").unwrap().2, 90);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_duplicate_in_one_file_keeps_the_first_document() {
    let d = dir("dup-file");
    std::fs::write(d.join("a.yaml"), format!("{}---\n{}", svc("web", 80), svc("web", 90))).unwrap();
    let state = state();
    let done = source(&d).refresh(&state).unwrap().unwrap();
    assert_eq!(done.problems.len(), 1, "{:?}", done.problems);
    assert!(done.problems[0].contains("documents 1 and 2"), "{:?}", done.problems);
    assert_eq!(port_of(&state, "web").unwrap().2, 80);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn this_nodes_object_follows_its_file() {
    let d = dir("node");
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}\n";
    std::fs::write(d.join("node.yaml"), node).unwrap();
    std::fs::write(
        d.join("other.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n",
    )
    .unwrap();
    let state = state();
    let mut source = source(&d);
    source.refresh(&state).unwrap();
    let zone = |state: &SharedState| state.read(|store, _| store.node().zone.clone());
    assert_eq!(zone(&state).as_deref(), Some("z1"));
    std::fs::remove_file(d.join("node.yaml")).unwrap();
    source.refresh(&state).unwrap();
    assert_eq!(zone(&state), None, "back to a bare Node");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_unreadable_path_changes_nothing() {
    let d = dir("gone");
    std::fs::write(d.join("a.yaml"), svc("a", 80)).unwrap();
    let state = state();
    let mut source = source(&d);
    source.refresh(&state).unwrap();
    let missing = ManifestSource::new(d.join("nope"), "n1".into(), "10.96.0.0/12".parse().unwrap())
        .refresh(&state)
        .unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
    assert!(port_of(&state, "a").is_some());
    std::fs::remove_dir_all(&d).unwrap();
}
