//! The module graph imports downward only (ARCHITECTURE.md, "Layers"). Each
//! top-level module of `src/` has a layer; a file may name (`crate::x`)
//! only modules of lower layers. A new upward import, say `use crate::config`
//! inside `domain` or `crate::cache` inside `config`, fails this test with
//! the file and the edge, before it can grow into a circle.

use std::{collections::BTreeSet, path::Path};

/// Bottom first. Same-layer modules may not import each other either.
const LAYERS: &[&[&str]] = &[
    // The checked values and self-contained foundations.
    &[
        "domain",
        "clock",
        "token",
        "proto",
        "metadata_protocol",
        "metrics",
    ],
    // Settings, and things that stand beside them.
    &["config", "client", "emulator"],
    // The kubelet's pod list and the API server's service accounts.
    &["kubernetes"],
    // Workload attestation: reads /proc for the doors, so policy need not.
    &["attest"],
    &["source", "policy", "logging"],
    &["cache"],
    &["sink"],
    &["server"],
    &["demo"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Top-level modules a file's code names through `crate::`, comments
/// ignored: `crate::a::b`, `crate::{a::x, b}`, `crate::{self as c}` and so on.
fn crate_imports(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `my_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of a brace group: those at depth 0 in it.
            let mut depth = 0;
            let mut name = String::new();
            let mut expect_name = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expect_name = true,
                    c if depth == 0 && expect_name && (c.is_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    c if depth == 0 && expect_name && c.is_whitespace() && name.is_empty() => {}
                    _ => {
                        if !name.is_empty() {
                            found.insert(std::mem::take(&mut name));
                        }
                        expect_name = false;
                    }
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found.remove("self");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_parser_sees_every_form_of_import() {
    let found = crate_imports(
        "use crate::{\n    cache::{A, B},\n    config::{self, C},\n    domain::D,\n    proto,\n};\n\
         // crate::commented::Out\n\
         fn f() { crate::metrics::get(); let _ = other_crate::x; }\n\
         use crate::{policy::{Caller, Decision}, server};",
    );
    let expected: BTreeSet<String> = [
        "cache", "config", "domain", "proto", "metrics", "policy", "server",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut unassigned = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            unassigned.insert(top);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for import in crate_imports(&text) {
            if import == top {
                continue;
            }
            match layer_of(&import) {
                Some(layer) if layer < own => {}
                Some(_) => violations.push(format!(
                    "src/{}: `crate::{import}` points up or sideways ({top} is in layer {own}, {import} in layer {})",
                    relative.display(),
                    layer_of(&import).unwrap()
                )),
                None => {
                    unassigned.insert(import);
                }
            }
        }
    }
    assert!(
        unassigned.is_empty(),
        "modules with no layer in tests/integration/layering.rs (add them, bottom first): {unassigned:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layering (ARCHITECTURE.md):\n{}",
        violations.join("\n")
    );
}
