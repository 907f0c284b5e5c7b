//! Loading policy directories as they are deployed: symbolic links, Kubernetes ConfigMap mounts,
//! link cycles, and files the loader must refuse.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

use std::os::unix::fs::symlink;
use std::path::Path;

use llm_policy_core::source::{load_policies, policy_files};
use llm_policy_core::PolicySet;

fn policy(name: &str) -> String {
    format!(
        "apiVersion: llm-policy/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n  defaultDecision: allow\n  rules:\n    - {{id: r-{name}, when: {{cel: 'request.stream'}}, action: {{decision: deny}}}}\n"
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Runs `f` on another thread and fails if it takes longer than a few seconds (a loop).
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the loader did not finish: a directory layout made it loop")
}

#[test]
fn a_configmap_mount_loads_each_policy_once() {
    // What the kubelet writes: the files in a timestamped directory, `..data` pointing at it, and
    // each file linked from the top through `..data`.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let stamp = root.join("..2026_11_25_10_00_00.123456789");
    write(&stamp.join("a.yaml"), &policy("a"));
    write(&stamp.join("b.yaml"), &policy("b"));
    symlink("..2026_11_25_10_00_00.123456789", root.join("..data")).unwrap();
    symlink("..data/a.yaml", root.join("a.yaml")).unwrap();
    symlink("..data/b.yaml", root.join("b.yaml")).unwrap();
    let root = root.to_path_buf();
    let (files, set) = bounded(move || {
        (
            policy_files(&root).unwrap(),
            PolicySet::load(&[&root]).map(|o| o.set.rule_count()),
        )
    });
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.yaml", "b.yaml"]);
    // Reported under the names a user sees, not the kubelet's directories.
    assert!(
        files.iter().all(|f| !f.to_string_lossy().contains("..")),
        "{files:?}"
    );
    assert_eq!(set.unwrap(), 2);
}

#[test]
fn link_cycles_do_not_loop() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("p.yaml"), &policy("p"));
    symlink(".", root.join("a")).unwrap();
    symlink(".", root.join("b")).unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    symlink("..", root.join("sub/up")).unwrap();
    let root = root.to_path_buf();
    let files = bounded(move || policy_files(&root).unwrap());
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn two_links_to_one_file_load_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("real/p.yaml"), &policy("p"));
    symlink("real/p.yaml", root.join("p.yaml")).unwrap();
    let docs = load_policies(&[root]).unwrap();
    assert_eq!(docs.len(), 1);
}

#[test]
fn a_dangling_link_is_a_located_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("ok.yaml"), &policy("ok"));
    symlink("missing.yaml", root.join("gone.yaml")).unwrap();
    let e = load_policies(&[root]).unwrap_err();
    assert_eq!(e.0[0].code, "io");
    assert!(e.0[0].file.as_deref().unwrap().ends_with("gone.yaml"));
}

#[test]
fn an_empty_directory_or_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    for path in [dir.path().to_path_buf(), empty] {
        let e = load_policies(&[&path]).unwrap_err();
        assert_eq!(e.0[0].code, "no-policies");
        assert_eq!(
            e.0[0].file.as_deref(),
            Some(path.display().to_string().as_str())
        );
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(llm_policy_core::source::MAX_FILE_BYTES + 1)
        .unwrap();
    let e = load_policies(&[&big]).unwrap_err();
    assert_eq!(e.0[0].code, "file-too-large");
}

#[test]
fn devices_and_fifos_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(&root.join("ok.yaml"), &policy("ok"));
    symlink("/dev/zero", root.join("zero.yaml")).unwrap();
    let fifo = root.join("pipe.yaml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let root = root.to_path_buf();
    let files = bounded({
        let root = root.clone();
        move || policy_files(&root).unwrap()
    });
    // Only the regular file is listed from the directory...
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ok.yaml"]);
    // ...and naming a device or a FIFO directly is an error, not a hang.
    for p in [root.join("zero.yaml"), fifo] {
        let e = bounded(move || load_policies(&[p]).unwrap_err());
        assert_eq!(e.0[0].code, "io");
        assert!(
            e.0[0].message.starts_with("not a regular file"),
            "{}",
            e.0[0].message
        );
    }
}
