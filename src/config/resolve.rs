//! What the settings resolve to on this machine: the identities to run
//! (application default credentials when none are configured) and the
//! socket's path and mode.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{IdentitySettings, Settings, SinkSettings, CREDENTIALS_ENV, SOCKET_ENV};
use crate::domain::{SourceKind, DEFAULT_IDENTITY};

impl Settings {
    /// The identities to run: those configured, else application default
    /// `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata server).
    pub fn effective_identities(&self, env: &HashMap<String, String>) -> Vec<IdentitySettings> {
        if !self.identities.is_empty() {
            return self.identities.clone();
        }
        let adc = env.get(CREDENTIALS_ENV).filter(|path| !path.is_empty());
        let Some(path) = adc.map(PathBuf::from) else {
            return vec![IdentitySettings::new(
                DEFAULT_IDENTITY,
                SourceKind::Metadata,
            )];
        };
        // Like Google's libraries, the file's `type` says what it is. A
        // file that cannot be read is taken for a key, whose loading then
        // reports the problem.
        let identity = match adc_file_type(&path).as_deref() {
            Some("external_account") => IdentitySettings {
                credential_file: Some(path),
                ..IdentitySettings::new(DEFAULT_IDENTITY, SourceKind::ExternalAccount)
            },
            Some("impersonated_service_account") => IdentitySettings {
                credential_file: Some(path),
                ..IdentitySettings::new(DEFAULT_IDENTITY, SourceKind::Impersonate)
            },
            _ => IdentitySettings {
                key_file: Some(path),
                ..IdentitySettings::new(DEFAULT_IDENTITY, SourceKind::ServiceAccountKey)
            },
        };
        vec![identity]
    }

    /// The socket to serve on: the configured one (flag and
    /// `TOKEN_BROKER_SOCKET` are already folded in by [`Settings::load`]),
    /// else the default for this user.
    pub fn socket_path(&self, env: &HashMap<String, String>) -> PathBuf {
        self.server
            .socket_path
            .clone()
            .unwrap_or_else(|| default_socket_path(env))
    }

    /// Socket permission bits (validated).
    pub fn socket_mode(&self) -> u32 {
        parse_mode(&self.server.socket_mode).unwrap_or(0o660)
    }
}

/// The `type` field of an application-default-credentials file, if it
/// can be read (a small JSON file; anything larger is not one).
fn adc_file_type(path: &Path) -> Option<String> {
    use std::io::Read;
    // The file may hold a private key or refresh token: wipe the copy.
    let mut text = zeroize::Zeroizing::new(String::new());
    std::fs::File::open(path)
        .ok()?
        .take(1024 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Typed {
        r#type: String,
    }
    serde_json::from_str::<Typed>(&text).ok().map(|t| t.r#type)
}

/// Socket resolution shared by the server and the clients: flag, then env
/// `TOKEN_BROKER_SOCKET`, then config, then the default for this user.
pub fn resolve_socket_path(
    flag: Option<&Path>,
    env: &HashMap<String, String>,
    configured: Option<&Path>,
) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    if let Some(path) = env.get(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(path) = configured {
        return path.to_path_buf();
    }
    default_socket_path(env)
}

fn default_socket_path(env: &HashMap<String, String>) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/token-broker/broker.sock");
    }
    match env.get("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => Path::new(dir).join("token-broker.sock"),
        None => std::env::temp_dir().join(format!(
            "token-broker-{}.sock",
            nix::unistd::geteuid().as_raw()
        )),
    }
}

pub(super) fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not an octal permission string like \"0660\""
        )),
    }
}

impl SinkSettings {
    /// The file's permission bits (validated).
    pub fn mode_bits(&self) -> u32 {
        parse_mode(&self.mode).unwrap_or(0o600)
    }
}

impl super::KubernetesSettings {
    /// The kubelet's pod list URL: `kubelet_url` (else
    /// `https://$NODE_NAME:10250`) with `/pods` appended, or why there is
    /// none, naming the key and the variable.
    pub fn kubelet_pods_url(&self, env: &HashMap<String, String>) -> Result<url::Url, String> {
        let base = match &self.kubelet_url {
            Some(url) => url.clone(),
            None => {
                let node = env
                    .get(super::NODE_NAME_ENV)
                    .map(|n| n.trim())
                    .filter(|n| !n.is_empty())
                    .ok_or(
                        "not set, and NODE_NAME is not in the environment: set kubelet_url, or \
                         give the DaemonSet `NODE_NAME` from the downward API (fieldPath: spec.nodeName)",
                    )?;
                if !node
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
                {
                    return Err(format!(
                        "NODE_NAME {node:?} is not a node name (a-z 0-9 - .)"
                    ));
                }
                format!("https://{node}:10250")
            }
        };
        let base = super::validate::base_url(&base)?;
        base.join(&format!("{}/pods", base.path().trim_end_matches('/')))
            .map_err(|e| format!("cannot append /pods to {base}: {e}"))
    }
}
