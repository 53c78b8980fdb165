//! Google's service-account JSON key files (PROTOCOLS.md §1), read once and
//! held only as a signing key that zeroizes itself on drop.
//!
//! Every problem is one line naming the file and what is wrong; nothing from
//! the file's content (least of all the key) is ever echoed back.

use std::{
    fmt,
    io::Read,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use jsonwebtoken::EncodingKey;

use crate::domain::trusted_path::PathError;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Key files are small; anything larger is not one.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why a key file cannot be used. Displayed as "key file PATH: PROBLEM".
#[derive(Debug, thiserror::Error)]
#[error("key file {}: {problem}", path.display())]
pub struct KeyFileError {
    pub path: PathBuf,
    pub problem: String,
}

/// A parsed, checked service-account key.
pub struct ServiceAccountKey {
    pub(crate) path: PathBuf,
    pub(crate) client_email: String,
    pub(crate) private_key_id: String,
    pub(crate) token_uri: url::Url,
    /// The key's `project_id`, when present and well-formed.
    pub(crate) project_id: Option<String>,
    /// Zeroized on drop by jsonwebtoken.
    pub(crate) signing_key: EncodingKey,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("path", &self.path)
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri.as_str())
            .field("signing_key", &"[redacted]")
            .finish()
    }
}

impl ServiceAccountKey {
    /// Reads and checks `path`. A file readable by group or others is
    /// refused unless `allow_insecure_permissions`, then only warned about.
    pub fn load(path: &Path, allow_insecure_permissions: bool) -> Result<Self, KeyFileError> {
        let text = read_secret_file(path, allow_insecure_permissions)?;
        Self::parse(path, &text).map_err(|problem| KeyFileError {
            path: path.to_path_buf(),
            problem,
        })
    }
}

/// Reads a file holding secrets with the checks key files get: links and
/// files owned by root or the broker's user only, not readable by group or
/// others unless `allow_insecure_permissions`, and small. The text is
/// zeroized on drop.
pub(crate) fn read_secret_file(
    path: &Path,
    allow_insecure_permissions: bool,
) -> Result<Zeroizing<String>, KeyFileError> {
    {
        let fail = |problem: String| KeyFileError {
            path: path.to_path_buf(),
            problem,
        };
        // Every directory and link on the way must be root's or this
        // user's (Kubernetes mounts Secrets through root-owned links, so
        // those are followed); see `trusted_path`.
        let me = nix::unistd::geteuid().as_raw();
        let trusted = |uid: u32| uid == 0 || uid == me;
        let real = crate::domain::trusted_path::resolve(path).map_err(|e| match e {
            PathError::Io { component, source } if component == path => {
                fail(format!("cannot be read: {}", io_reason(&source)))
            }
            PathError::Io { component, source } => fail(format!(
                "cannot be read: {}: {}",
                component.display(),
                io_reason(&source)
            )),
            untrusted => fail(format!("is not safe to read: {untrusted}")),
        })?;
        // Nothing on the way can change now; the file itself must not be a
        // link either (it was resolved), so refuse one that appeared since.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
            .open(&real)
            .map_err(|e| fail(format!("cannot be read: {}", io_reason(&e))))?;
        let meta = file
            .metadata()
            .map_err(|e| fail(format!("cannot be read: {}", io_reason(&e))))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        if !trusted(meta.uid()) {
            return Err(fail(format!(
                "is owned by uid {}, not by the broker's user ({me}) or root",
                meta.uid()
            )));
        }
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(fail(format!(
                "is {} bytes, too large for a key file",
                meta.len()
            )));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            if !allow_insecure_permissions {
                return Err(fail(format!(
                    "is readable by group or others (mode {mode:04o}); run `chmod 600` on it, \
                     or set allow_insecure_key_permissions = true for this identity"
                )));
            }
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "key file is readable by group or others; allowed by allow_insecure_key_permissions"
            );
        }
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text)
            .map_err(|e| fail(format!("cannot be read: {}", io_reason(&e))))?;
        Ok(text)
    }
}

impl ServiceAccountKey {
    /// Parses key-file JSON. The error is the problem alone (no path).
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let json: Value = serde_json::from_str(text).map_err(|e| {
            // serde_json's message can quote content; report position only.
            format!(
                "is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let Value::Object(mut fields) = json else {
            return Err("is not a JSON object".into());
        };
        // Move the key text out at once so it is zeroized when dropped.
        let pem = match fields.remove("private_key") {
            None => return Err("field `private_key` is missing".into()),
            Some(Value::String(pem)) => Zeroizing::new(pem),
            Some(_) => return Err("field `private_key` is not a string".into()),
        };
        if pem.trim().is_empty() {
            return Err("field `private_key` is empty".into());
        }
        let fields = &fields;
        let kind = string_field(fields, "type")?;
        if kind != "service_account" {
            return Err(format!(
                "field `type` is {kind:?}; only \"service_account\" keys can mint ID tokens"
            ));
        }
        check_universe_domain(fields, "ID tokens from key files work")?;
        let client_email = string_field(fields, "client_email")?.to_owned();
        let private_key_id = string_field(fields, "private_key_id")?.to_owned();
        let token_uri_text = string_field(fields, "token_uri")?;
        let token_uri =
            crate::domain::upstream_url::parse_https_or_loopback(token_uri_text, "token_uri")?;
        // Optional, and only informational (the metadata endpoint's
        // `project/project-id`): a malformed one is left out, not an error.
        let project_id = fields
            .get("project_id")
            .and_then(Value::as_str)
            .filter(|p| super::instance::InstanceValue::ProjectId.check(p).is_ok())
            .map(str::to_owned);
        if !pem.contains("-----BEGIN PRIVATE KEY-----") {
            return Err(
                "field `private_key` is not a PKCS#8 PEM key (\"-----BEGIN PRIVATE KEY-----\")"
                    .into(),
            );
        }
        let signing_key = EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|_| "field `private_key` is not a readable RSA private key".to_owned())?;
        // from_rsa_pem only decodes the PEM; sign once so a corrupt key fails now.
        jsonwebtoken::crypto::sign(b"probe", &signing_key, jsonwebtoken::Algorithm::RS256)
            .map_err(|_| "field `private_key` is not a usable RSA private key".to_owned())?;
        Ok(Self {
            path: path.to_path_buf(),
            client_email,
            private_key_id,
            token_uri,
            project_id,
            signing_key,
        })
    }

    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    pub fn private_key_id(&self) -> &str {
        &self.private_key_id
    }

    pub fn token_uri(&self) -> &url::Url {
        &self.token_uri
    }
}

/// A credential file's string field, present and not blank.
pub(crate) fn string_field<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a str, String> {
    match fields.get(name) {
        None => Err(format!("field `{name}` is missing")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field `{name}` is empty")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field `{name}` is not a string")),
    }
}

/// A credential file's `universe_domain`, when present, must be Google's
/// public one: `what` (e.g. "ID tokens from key files work") says why.
pub(crate) fn check_universe_domain(fields: &Map<String, Value>, what: &str) -> Result<(), String> {
    match fields.get("universe_domain").map(Value::as_str) {
        None | Some(Some("googleapis.com")) => Ok(()),
        Some(Some(other)) => Err(format!(
            "field `universe_domain` is {other:?}; {what} only in googleapis.com"
        )),
        Some(None) => Err("field `universe_domain` is not a string".into()),
    }
}

fn io_reason(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => err.to_string(),
    }
}
