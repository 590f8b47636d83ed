//! Pipeline and manifest files: every example parses, schemas are current, diagnostics have lines.

use crate::util::*;

#[test]
fn schemas_are_up_to_date() {
    let dir = root().join("schemas");
    if std::env::var_os("FERRY_BLESS").is_some() {
        ferry::schemas::write(&dir).unwrap();
    }
    for (name, text) in ferry::schemas::generate() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed == text,
            "schemas/{name} is stale: run `cargo run -- schema` (or FERRY_BLESS=1 cargo test schemas) and commit it"
        );
    }
}

#[test]
fn every_example_pipeline_and_manifest_parses() {
    let mut pipelines = 0;
    for dir in ["pipelines"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                ferry::spec::load_pipeline(&path).unwrap_or_else(|e| panic!("{e}"));
                pipelines += 1;
            }
        }
    }
    assert!(pipelines >= 2);
    for dir in ["operators", "tests/fixtures/operators"] {
        let found = ferry::ops::load_manifests(&root().join(dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!found.is_empty(), "{dir}");
    }
}

#[test]
fn every_task_kind_is_registered_once() {
    let names: std::collections::HashSet<_> = ferry::ops::TASKS.iter().map(|t| t.name).collect();
    assert_eq!(names.len(), ferry::ops::TASKS.len());
    for t in ferry::ops::TASKS {
        assert_eq!(t.kind.info().name, t.name);
        // The manifest spelling of the kind is the registered name.
        let yaml: ferry::ops::TaskKind = ferry::spec::yaml::from_str(t.name).unwrap();
        assert_eq!(yaml, t.kind);
    }
}

#[test]
fn manifest_problems_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "name: a\ntask: embed\nmodel: m\nbatch: 3\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "name: B-bad\ntask: embed\nmodel: m\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "name: c\ntask: translate_poems\nmodel: m\n",
    )
    .unwrap();
    let err = ferry::ops::load_manifests(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.yaml:4:1: batch: unknown field `batch`"),
        "{err}"
    );
    assert!(
        err.contains("b.yaml:1:1: name: operator name 'B-bad'"),
        "{err}"
    );
    assert!(
        err.contains("c.yaml:2:1: task: unknown variant `translate_poems`"),
        "{err}"
    );
}
