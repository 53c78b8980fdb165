//! Issue 3's key-file checks, through the binary: every malformed or unsafe
//! key file fails `check-config` and `serve` with one line naming the file
//! and the problem, and never echoes the key.

use std::path::{Path, PathBuf};

use serde_json::Value;
use token_broker::emulator::{generate_service_account_key, GOOGLE_TOKEN_URL};

use crate::support::{self, Broker};

const ACCOUNT: &str = "deployer@proj.iam.gserviceaccount.com";

/// A freshly generated key file's JSON, as Google would hand it out.
fn fresh_key_json() -> Value {
    let generated = generate_service_account_key(ACCOUNT, GOOGLE_TOKEN_URL).unwrap();
    serde_json::from_str(&generated.json).unwrap()
}

/// Writes `text` to `dir/name` readable by its owner only, so the
/// permission check passes and the content is what gets judged.
fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    support::set_mode(&path, 0o600);
    path
}

/// Writes a config serving one key identity and returns its path.
fn config_for(dir: &Path, identity: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        support::config_text(&dir.join("broker.sock"), identity),
    )
    .unwrap();
    path
}

/// Runs `token-broker ARGS --config CONFIG` and asserts it exits 2 with a
/// single stderr line naming `key_file` and containing every `expected`;
/// returns that line.
fn assert_one_line_error(
    command: &str,
    config: &Path,
    key_file: &Path,
    expected: &[&str],
) -> String {
    let (code, stdout, stderr) = support::run_cli(&[command, "--config", config.to_str().unwrap()]);
    let line = stderr.trim();
    assert_eq!(
        code, 2,
        "{command} {expected:?}: stdout {stdout:?}, stderr {stderr:?}"
    );
    assert!(
        !line.contains('\n'),
        "{command} {expected:?}: more than one line: {stderr:?}"
    );
    assert!(
        line.starts_with("error: invalid configuration: identities[0].key_file: key file "),
        "{line}"
    );
    assert!(
        line.contains(&key_file.display().to_string()),
        "the path is not named: {line}"
    );
    for text in expected {
        assert!(line.contains(text), "expected {text:?} in {line:?}");
    }
    assert!(!stdout.contains("configuration OK"), "{stdout}");
    line.to_owned()
}

#[test]
fn every_malformed_key_file_is_one_line_naming_the_file_and_the_problem() {
    let dir = support::workdir();
    let valid = fresh_key_json();
    let valid_path = write_private(
        dir.path(),
        "valid.json",
        &serde_json::to_string_pretty(&valid).unwrap(),
    );
    let pem = support::pem_lines(&valid_path);
    assert!(pem.len() > 10);

    // (file name, file text, expected problem texts)
    let mut cases: Vec<(String, String, Vec<String>)> = Vec::new();
    let mutated = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut json = valid.clone();
        change(json.as_object_mut().unwrap());
        serde_json::to_string_pretty(&json).unwrap()
    };

    // Cut off inside the private key: the parser's message must not quote it.
    let text = serde_json::to_string_pretty(&valid).unwrap();
    let cut = text.find(&pem[3]).unwrap() + 10;
    cases.push((
        "truncated".into(),
        text[..cut].to_owned(),
        vec!["not valid JSON".into()],
    ));
    cases.push((
        "not-json".into(),
        "this is not json\n".into(),
        vec!["not valid JSON".into()],
    ));
    for field in [
        "type",
        "client_email",
        "private_key",
        "private_key_id",
        "token_uri",
    ] {
        cases.push((
            format!("missing-{field}"),
            mutated(&|json| {
                json.remove(field);
            }),
            vec![format!("field `{field}` is missing")],
        ));
    }
    for field in ["client_email", "private_key", "private_key_id"] {
        cases.push((
            format!("empty-{field}"),
            mutated(&|json| {
                json.insert(field.into(), "".into());
            }),
            vec![format!("field `{field}` is empty")],
        ));
    }
    cases.push((
        "wrong-type".into(),
        mutated(&|json| {
            json.insert("type".into(), "authorized_user".into());
        }),
        vec!["authorized_user".into(), "service_account".into()],
    ));
    cases.push((
        "garbage-key".into(),
        mutated(&|json| {
            json.insert(
                "private_key".into(),
                "-----BEGIN PRIVATE KEY-----\nthis is !! not base64 ~~ at all\n-----END PRIVATE KEY-----\n".into(),
            );
        }),
        vec!["field `private_key`".into()],
    ));
    cases.push((
        "garbage-der".into(),
        mutated(&|json| {
            json.insert(
                "private_key".into(),
                format!(
                    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                    "QUFB".repeat(16)
                )
                .into(),
            );
        }),
        vec!["field `private_key`".into()],
    ));
    // The real key body under a PKCS#1 label: refused, and not echoed.
    cases.push((
        "pkcs1-label".into(),
        mutated(&|json| {
            let pem = json["private_key"]
                .as_str()
                .unwrap()
                .replace("PRIVATE KEY", "RSA PRIVATE KEY");
            json.insert("private_key".into(), pem.into());
        }),
        vec!["field `private_key`".into()],
    ));
    cases.push((
        "universe".into(),
        mutated(&|json| {
            json.insert("universe_domain".into(), "example.com".into());
        }),
        vec!["universe_domain".into(), "example.com".into()],
    ));

    for (name, text, expected) in &cases {
        let case_dir = support::workdir();
        let key = write_private(case_dir.path(), &format!("{name}.json"), text);
        let config = config_for(case_dir.path(), &support::key_identity("default", &key));
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        let line = assert_one_line_error("check-config", &config, &key, &expected);
        for pem_line in &pem {
            assert!(
                !line.contains(pem_line.as_str()),
                "{name}: the key reached stderr"
            );
        }
    }

    // The untouched key passes, so every failure above is the mutation's.
    let config = config_for(dir.path(), &support::key_identity("default", &valid_path));
    let (code, stdout, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout {stdout:?}, stderr {stderr:?}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
}

#[test]
fn a_key_file_that_cannot_be_read_is_one_line_naming_the_file() {
    let dir = support::workdir();

    let missing = dir.path().join("missing.json");
    let config = config_for(dir.path(), &support::key_identity("default", &missing));
    assert_one_line_error("check-config", &config, &missing, &["no such file"]);

    let directory = dir.path().join("a-directory.json");
    std::fs::create_dir(&directory).unwrap();
    support::set_mode(&directory, 0o700);
    let config = config_for(dir.path(), &support::key_identity("default", &directory));
    assert_one_line_error("check-config", &config, &directory, &["not a regular file"]);

    // Root reads any file, so an unreadable one exists only for other users.
    if !nix::unistd::geteuid().is_root() {
        let unreadable =
            write_private(dir.path(), "unreadable.json", &fresh_key_json().to_string());
        support::set_mode(&unreadable, 0o000);
        let config = config_for(dir.path(), &support::key_identity("default", &unreadable));
        assert_one_line_error("check-config", &config, &unreadable, &["permission denied"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_readable_by_others_is_refused_unless_allowed_and_then_warned_about() {
    let dir = support::workdir();
    let key = write_private(dir.path(), "shared.json", &fresh_key_json().to_string());
    support::set_mode(&key, 0o644);

    let identity = support::key_identity("default", &key);
    let config = config_for(dir.path(), &identity);
    assert_one_line_error(
        "check-config",
        &config,
        &key,
        &[
            "readable by group or others",
            "0644",
            "allow_insecure_key_permissions",
        ],
    );

    let allowed = format!("{identity}allow_insecure_key_permissions = true\n");
    let config = config_for(dir.path(), &allowed);
    let (code, stdout, stderr) =
        support::run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout {stdout:?}, stderr {stderr:?}");
    assert!(stdout.contains("configuration OK"), "{stdout}");

    let broker = Broker::start(move |socket| support::config_text(socket, &allowed), "info").await;
    let log = broker.log();
    let warning = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains("allow_insecure_key_permissions"))
        .unwrap_or_else(|| panic!("no warning about the allowed insecure key file:\n{log}"));
    assert!(warning.contains(&key.display().to_string()), "{warning}");
}

#[test]
fn serve_refuses_a_bad_key_file_with_the_same_one_line_error() {
    let dir = support::workdir();
    let mut json = fresh_key_json();
    json.as_object_mut().unwrap().remove("client_email");
    let key = write_private(dir.path(), "no-email.json", &json.to_string());
    let config = config_for(dir.path(), &support::key_identity("default", &key));

    let from_serve =
        assert_one_line_error("serve", &config, &key, &["field `client_email` is missing"]);
    let from_check = assert_one_line_error(
        "check-config",
        &config,
        &key,
        &["field `client_email` is missing"],
    );
    assert_eq!(from_serve, from_check);
    assert!(
        !dir.path().join("broker.sock").exists(),
        "serve bound its socket despite the bad key"
    );
}
