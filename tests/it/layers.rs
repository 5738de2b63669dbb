//! The layering docs/ARCHITECTURE.md promises, checked on the sources: which
//! part of the server may import which. (The protocol crate's independence from
//! tokio and the store is its Cargo.toml: it cannot name them.)

use std::path::Path;

/// Every `crate::<part>` a part's sources name.
fn imports(part: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(part);
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                found.push((path.display().to_string(), name));
            }
        }
    }
    found
}

fn assert_never(part: &str, forbidden: &[&str]) {
    let crossings: Vec<_> = imports(part)
        .into_iter()
        .filter(|(_, name)| forbidden.contains(&name.as_str()))
        .collect();
    assert!(
        crossings.is_empty(),
        "{part} must not import {forbidden:?}: {crossings:?}"
    );
}

#[test]
fn transports_do_not_know_the_shard_or_the_chat() {
    assert_never("transport", &["shard", "chat", "store", "server"]);
}

#[test]
fn chat_rules_do_not_know_shards_or_transports() {
    assert_never("chat", &["shard", "transport", "server", "auth"]);
}

#[test]
fn the_store_depends_on_nothing_above_it() {
    assert_never("store", &["shard", "transport", "chat", "auth", "server", "cluster"]);
}

#[test]
fn cluster_membership_does_not_know_shards_or_the_chat() {
    assert_never("cluster", &["shard", "transport", "chat", "auth", "server"]);
}

#[test]
fn accounts_do_not_know_shards_or_transports() {
    assert_never("auth", &["shard", "transport", "chat", "server"]);
}
