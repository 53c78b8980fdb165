//! Key material of the emulated Google: the issuer key that signs every ID
//! token (published as PEM certificates and as a JWKS, like
//! `googleapis.com/oauth2/v{1,3}/certs`), and service-account keys, generated
//! in Google's JSON key-file format and "uploaded" to the token endpoint as
//! registrations holding only their public half.
//!
//! RSA keys are generated with aws-lc (through rcgen), which takes tens of
//! milliseconds instead of the seconds a pure-Rust generator can need in a
//! debug build. Callers in async code run generation on a blocking thread.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::EmulatorError;

/// The signing key of the emulated `accounts.google.com`.
pub(crate) struct IssuerKey {
    key_id: String,
    encoding_key: EncodingKey,
    modulus: Vec<u8>,
    exponent: Vec<u8>,
    certificate_pem: String,
}

// The encoding key is private key material: never print it.
impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKey")
            .field("key_id", &self.key_id)
            .field("encoding_key", &"[redacted]")
            .finish()
    }
}

impl IssuerKey {
    /// Generates a fresh RSA 2048 issuer key and its self-signed certificate.
    /// CPU-bound: call it from a blocking thread.
    pub(crate) fn generate() -> Result<Self, EmulatorError> {
        let key_pair = generate_rsa_key_pair()?;
        let private_pem = zeroizing(key_pair.serialize_pem());
        let encoding_key = EncodingKey::from_rsa_pem(private_pem.as_bytes())
            .map_err(|e| EmulatorError::KeyGeneration(format!("issuer key unusable: {e}")))?;
        let public_key = public_key_from_pkcs8_der(key_pair.serialized_der())?;

        // google-auth verifies against the v1 endpoint, which publishes X.509
        // certificates rather than bare keys, so the issuer key needs one.
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "token-broker-emulator issuer");
        let certificate = params
            .self_signed(&key_pair)
            .map_err(|e| EmulatorError::KeyGeneration(format!("issuer certificate: {e}")))?;

        Ok(Self {
            key_id: random_key_id(),
            encoding_key,
            modulus: public_key.n.clone(),
            exponent: public_key.e.clone(),
            certificate_pem: certificate.pem(),
        })
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    pub(crate) fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_rsa_raw_components(&self.modulus, &self.exponent)
    }

    /// Signs `claims` as an RS256 JWT whose header names this key.
    pub(crate) fn sign<T: Serialize>(&self, claims: &T) -> Result<String, EmulatorError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding_key)
            .map_err(|e| EmulatorError::Signing(e.to_string()))
    }

    /// The body of `/oauth2/v1/certs`: key id → PEM certificate.
    pub(crate) fn certs_v1(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert(
            self.key_id.clone(),
            serde_json::Value::String(self.certificate_pem.clone()),
        );
        serde_json::Value::Object(map)
    }

    /// The body of `/oauth2/v3/certs`: a JWKS.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "RSA",
                "alg": "RS256",
                "use": "sig",
                "kid": self.key_id,
                "n": URL_SAFE_NO_PAD.encode(&self.modulus),
                "e": URL_SAFE_NO_PAD.encode(&self.exponent),
            }]
        })
    }
}

/// A service-account key as Google knows it after the key was uploaded: the
/// account, the key's id and its public half. The private key never reaches
/// the emulator's token endpoint.
#[derive(Clone, Debug)]
pub struct ServiceAccountRegistration {
    /// The account's email, the `iss` of its assertions.
    pub client_email: String,
    /// The key's id (`private_key_id` in the key file), the `kid` of its assertions.
    pub key_id: String,
    /// The key's public half, used to verify assertion signatures.
    pub public_key: RsaPublicKey,
    /// The account's numeric unique id, the `sub` and `azp` of its ID tokens.
    pub client_id: String,
}

/// The fields of a Google key file the emulator reads. Unknown fields are
/// allowed: real key files carry several the emulator has no use for.
#[derive(Deserialize)]
struct KeyFileFields {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_id: Option<String>,
}

impl ServiceAccountRegistration {
    /// Reads a Google JSON key file and derives the registration Google would
    /// hold after the key was uploaded.
    pub fn from_key_file(path: &Path) -> Result<Self, EmulatorError> {
        let json = zeroizing(std::fs::read_to_string(path).map_err(|source| {
            EmulatorError::ReadKeyFile {
                path: path.to_owned(),
                source,
            }
        })?);
        Self::from_key_json(&json)
    }

    /// Like [`Self::from_key_file`], from the file's text.
    pub fn from_key_json(json: &str) -> Result<Self, EmulatorError> {
        // serde_json's messages can quote values; report only the position so
        // no fragment of a private key ends up in an error or a log.
        let fields: KeyFileFields = serde_json::from_str(json).map_err(|e| {
            EmulatorError::InvalidKey(format!(
                "not a JSON key file (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if let Some(kind) = fields.kind.as_deref() {
            if kind != "service_account" {
                return Err(EmulatorError::InvalidKey(format!(
                    "type is {kind:?}, expected \"service_account\""
                )));
            }
        }
        let client_email = required(fields.client_email, "client_email")?;
        let key_id = required(fields.private_key_id, "private_key_id")?;
        let private_key = zeroizing(required(fields.private_key, "private_key")?);
        let public_key = public_key_from_pem(&private_key)?;
        // Key files always carry client_id; a hand-made one without it still
        // gets a stable-looking numeric id so issued tokens have a `sub`.
        let client_id = match fields.client_id {
            Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => id,
            Some(_) => {
                return Err(EmulatorError::InvalidKey(
                    "client_id must be a numeric string".to_owned(),
                ))
            }
            None => random_numeric_id(),
        };
        Ok(Self {
            client_email,
            key_id,
            public_key,
            client_id,
        })
    }
}

fn required(value: Option<String>, field: &str) -> Result<String, EmulatorError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(EmulatorError::InvalidKey(format!(
            "missing or empty field {field}"
        ))),
    }
}

/// A freshly generated service-account key.
pub struct GeneratedKey {
    /// The whole key file, as Google's console would download it.
    pub json: String,
    /// What the emulator's token endpoint needs to accept the key.
    pub registration: ServiceAccountRegistration,
}

// `json` holds the private key.
impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("json", &"[redacted]")
            .field("registration", &self.registration)
            .finish()
    }
}

/// Google's key-file layout, in Google's field order.
#[derive(Serialize)]
struct KeyFile<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    project_id: &'a str,
    private_key_id: &'a str,
    private_key: &'a str,
    client_email: &'a str,
    client_id: &'a str,
    auth_uri: &'a str,
    token_uri: &'a str,
    auth_provider_x509_cert_url: &'a str,
    client_x509_cert_url: &'a str,
    universe_domain: &'a str,
}

/// Generates a service-account key in Google's JSON key-file format (RSA 2048,
/// PKCS#8 PEM, random 40-hex `private_key_id`, numeric `client_id`) whose
/// `token_uri` is `token_uri`. CPU-bound: async callers should use
/// `tokio::task::spawn_blocking`.
pub fn generate_service_account_key(
    client_email: &str,
    token_uri: &str,
) -> Result<GeneratedKey, EmulatorError> {
    if client_email.is_empty() {
        return Err(EmulatorError::InvalidKey(
            "client_email must not be empty".to_owned(),
        ));
    }
    let key_pair = generate_rsa_key_pair()?;
    let private_pem = zeroizing(key_pair.serialize_pem());
    let public_key = public_key_from_pkcs8_der(key_pair.serialized_der())?;
    let key_id = random_key_id();
    let client_id = random_numeric_id();
    let project_id = project_id_from_email(client_email);
    let cert_url = format!(
        "https://www.googleapis.com/robot/v1/metadata/x509/{}",
        url::form_urlencoded::byte_serialize(client_email.as_bytes()).collect::<String>()
    );
    let file = KeyFile {
        kind: "service_account",
        project_id: &project_id,
        private_key_id: &key_id,
        private_key: &private_pem,
        client_email,
        client_id: &client_id,
        auth_uri: "https://accounts.google.com/o/oauth2/auth",
        token_uri,
        auth_provider_x509_cert_url: "https://www.googleapis.com/oauth2/v1/certs",
        client_x509_cert_url: &cert_url,
        universe_domain: "googleapis.com",
    };
    let mut json = serde_json::to_string_pretty(&file)
        .map_err(|e| EmulatorError::KeyGeneration(format!("serialising key file: {e}")))?;
    json.push('\n');
    Ok(GeneratedKey {
        json,
        registration: ServiceAccountRegistration {
            client_email: client_email.to_owned(),
            key_id,
            public_key,
            client_id,
        },
    })
}

/// Generates a key (see [`generate_service_account_key`]), writes the key file
/// to `path` readable by its owner only (0600, replacing any existing file),
/// and returns its registration.
pub fn write_key_file(
    path: &Path,
    client_email: &str,
    token_uri: &str,
) -> Result<ServiceAccountRegistration, EmulatorError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let generated = generate_service_account_key(client_email, token_uri)?;
    let write_err = |source| EmulatorError::WriteKeyFile {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    // `mode` applies only when the file is created; an existing file keeps
    // its old permissions unless they are reset here, before the key lands.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(generated.json.as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(generated.registration.clone())
}

/// The accounts whose keys the token endpoint accepts: email → account.
#[derive(Debug, Default)]
pub(crate) struct AccountRegistry {
    accounts: HashMap<String, RegisteredAccount>,
}

#[derive(Clone, Debug)]
pub(crate) struct RegisteredAccount {
    pub(crate) client_id: String,
    /// Key id → public key. Google lets an account hold several keys.
    keys: HashMap<String, RsaPublicKey>,
}

impl RegisteredAccount {
    pub(crate) fn decoding_key(&self, key_id: &str) -> Option<DecodingKey> {
        self.keys
            .get(key_id)
            .map(|k| DecodingKey::from_rsa_raw_components(&k.n, &k.e))
    }
}

impl AccountRegistry {
    /// Adds a key. A second key for a known account joins it and keeps the
    /// account's first client id, as a second key uploaded to Google would.
    pub(crate) fn register(&mut self, reg: ServiceAccountRegistration) {
        let account = self
            .accounts
            .entry(reg.client_email)
            .or_insert_with(|| RegisteredAccount {
                client_id: reg.client_id,
                keys: HashMap::new(),
            });
        account.keys.insert(reg.key_id, reg.public_key);
    }

    pub(crate) fn get(&self, email: &str) -> Option<&RegisteredAccount> {
        self.accounts.get(email)
    }
}

fn generate_rsa_key_pair() -> Result<rcgen::KeyPair, EmulatorError> {
    rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .map_err(|e| EmulatorError::KeyGeneration(e.to_string()))
}

/// The public half of an RSA key: modulus and exponent, big-endian, as a
/// JWKS publishes them and a verifier needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaPublicKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl RsaPublicKey {
    /// Reads the public half of an RSA private key in PKCS#8 DER, or in
    /// PKCS#1 DER when `pkcs1` is set.
    fn from_private_der(der: &[u8], pkcs1: bool) -> Result<Self, String> {
        use aws_lc_rs::signature::KeyPair as _;
        let pair = if pkcs1 {
            aws_lc_rs::rsa::KeyPair::from_der(der)
        } else {
            aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
        }
        .map_err(|e| e.to_string())?;
        let public = pair.public_key();
        Ok(Self {
            n: public.modulus().big_endian_without_leading_zero().to_vec(),
            e: public.exponent().big_endian_without_leading_zero().to_vec(),
        })
    }
}

fn public_key_from_pkcs8_der(der: &[u8]) -> Result<RsaPublicKey, EmulatorError> {
    RsaPublicKey::from_private_der(der, false)
        .map_err(|e| EmulatorError::KeyGeneration(format!("generated key unreadable: {e}")))
}

/// Google key files hold PKCS#8 ("PRIVATE KEY"); PKCS#1 ("RSA PRIVATE KEY")
/// is accepted too since openssl-made test keys often use it.
fn public_key_from_pem(text: &str) -> Result<RsaPublicKey, EmulatorError> {
    let invalid = |e: String| {
        EmulatorError::InvalidKey(format!("private_key is not an RSA private key in PEM: {e}"))
    };
    let block = pem::parse(text).map_err(|e| invalid(e.to_string()))?;
    let pkcs1 = match block.tag() {
        "PRIVATE KEY" => false,
        "RSA PRIVATE KEY" => true,
        other => return Err(invalid(format!("a {other:?} block"))),
    };
    RsaPublicKey::from_private_der(block.contents(), pkcs1).map_err(invalid)
}

/// A 40-hex-digit key id, the shape of Google's `private_key_id`.
pub(crate) fn random_key_id() -> String {
    let mut bytes = [0u8; 20];
    rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 21-digit numeric id, the shape of a service account's unique id.
pub(crate) fn random_numeric_id() -> String {
    let id: u128 = rand::random_range(100_000_000_000_000_000_000..1_000_000_000_000_000_000_000);
    id.to_string()
}

/// `name@PROJECT.iam.gserviceaccount.com` → `PROJECT`; anything else gets a
/// placeholder project.
pub(crate) fn project_id_from_email(email: &str) -> String {
    email
        .split_once('@')
        .and_then(|(_, domain)| domain.strip_suffix(".iam.gserviceaccount.com"))
        .filter(|p| !p.is_empty())
        .unwrap_or("token-broker-emulator")
        .to_owned()
}

/// Holds private key text and wipes it on drop, so key copies do not linger in
/// freed memory.
fn zeroizing(s: String) -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sa.json");
        std::fs::write(&path, "old").expect("pre-existing file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let email = "deployer@my-project.iam.gserviceaccount.com";
        let reg = write_key_file(&path, email, "http://127.0.0.1:1/token").expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let text = std::fs::read_to_string(&path).expect("read");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        for field in [
            "type",
            "project_id",
            "private_key_id",
            "private_key",
            "client_email",
            "client_id",
            "auth_uri",
            "token_uri",
            "auth_provider_x509_cert_url",
            "client_x509_cert_url",
            "universe_domain",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["project_id"], "my-project");
        assert_eq!(v["universe_domain"], "googleapis.com");
        assert_eq!(v["token_uri"], "http://127.0.0.1:1/token");
        assert!(v["private_key"]
            .as_str()
            .expect("pem")
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let key_id = v["private_key_id"].as_str().expect("kid");
        assert_eq!(key_id.len(), 40);
        assert!(key_id.bytes().all(|b| b.is_ascii_hexdigit()));

        let read = ServiceAccountRegistration::from_key_file(&path).expect("parse");
        assert_eq!(read.client_email, email);
        assert_eq!(read.key_id, reg.key_id);
        assert_eq!(read.client_id, reg.client_id);
        assert_eq!(read.public_key, reg.public_key);
        // The private key in the file is usable by jsonwebtoken as the broker uses it.
        EncodingKey::from_rsa_pem(v["private_key"].as_str().expect("pem").as_bytes())
            .expect("jsonwebtoken reads the PKCS#8 key");
    }

    #[test]
    fn bad_key_json_is_refused_without_echoing_it() {
        let err = ServiceAccountRegistration::from_key_json(
            r#"{"type":"service_account","client_email":"a@b","private_key_id":"k","private_key":"SECRET-NOT-PEM"}"#,
        )
        .expect_err("not a key");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        let err = ServiceAccountRegistration::from_key_json(r#"{"private_key": 5"#)
            .expect_err("not json");
        assert!(matches!(err, EmulatorError::InvalidKey(_)), "{err}");
        let err = ServiceAccountRegistration::from_key_json(r#"{"type":"authorized_user"}"#)
            .expect_err("wrong type");
        assert!(err.to_string().contains("service_account"), "{err}");
    }
}
