//! Helpers shared by the emulator's unit tests: start an emulator, talk to it
//! over real HTTP, build and sign assertions as a client library would, and
//! verify what comes back.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use super::{generate_service_account_key, Emulator, EmulatorOptions, GeneratedKey};

pub(crate) async fn start() -> Emulator {
    Emulator::start(EmulatorOptions::default())
        .await
        .expect("emulator starts")
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

pub(crate) fn identity_url(emulator: &Emulator, audience: &str, format: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("audience", audience)
        .append_pair("format", format)
        .finish();
    format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/identity?{query}",
        emulator.base_url()
    )
}

/// Fetches an identity token, asserting success.
pub(crate) async fn get_identity(
    client: &reqwest::Client,
    emulator: &Emulator,
    audience: &str,
    format: &str,
) -> String {
    let response = client
        .get(identity_url(emulator, audience, format))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("identity request");
    assert_eq!(response.status(), 200);
    response.text().await.expect("identity body")
}

/// Verifies an RS256 token's signature, expiry and audience; returns its claims.
pub(crate) fn verify(jwt: &str, key: &DecodingKey, audience: &str) -> Value {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://accounts.google.com"]);
    jsonwebtoken::decode::<Value>(jwt, key, &validation)
        .expect("token verifies")
        .claims
}

/// A token's claims without any check, for tokens meant to be bad.
pub(crate) fn unverified(jwt: &str) -> Value {
    jsonwebtoken::dangerous::insecure_decode::<Value>(jwt)
        .expect("token decodes")
        .claims
}

pub(crate) fn unix_now() -> i64 {
    i64::try_from(crate::clock::Clock::system().unix_seconds()).expect("time fits")
}

pub(crate) fn generate_key(email: &str) -> GeneratedKey {
    generate_service_account_key(email, "http://127.0.0.1:1/token").expect("key generates")
}

/// Generates a key for `email` and uploads it to the emulator.
pub(crate) fn register_key(emulator: &Emulator, email: &str) -> GeneratedKey {
    let key = generate_service_account_key(email, &emulator.token_uri()).expect("key generates");
    emulator.register_service_account(key.registration.clone());
    key
}

/// The claims of a self-signed assertion, as PROTOCOLS.md §2 builds them.
pub(crate) struct AssertionClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) target_audience: String,
    pub(crate) iat: i64,
    pub(crate) exp: i64,
}

impl AssertionClaims {
    pub(crate) fn new(key: &GeneratedKey, aud: &str, target_audience: &str) -> Self {
        let iat = unix_now() - 10;
        Self {
            iss: key.registration.client_email.clone(),
            sub: key.registration.client_email.clone(),
            aud: aud.to_owned(),
            target_audience: target_audience.to_owned(),
            iat,
            exp: iat + 3600,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "iss": self.iss,
            "sub": self.sub,
            "aud": self.aud,
            "target_audience": self.target_audience,
            "iat": self.iat,
            "exp": self.exp,
        })
    }
}

pub(crate) fn sign_assertion(key: &GeneratedKey, claims: &Value) -> String {
    sign_assertion_with_kid(key, claims, &key.registration.key_id)
}

pub(crate) fn sign_assertion_with_kid(key: &GeneratedKey, claims: &Value, kid: &str) -> String {
    let file: Value = serde_json::from_str(&key.json).expect("key json");
    let pem = file["private_key"].as_str().expect("private_key");
    let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &encoding).expect("assertion signs")
}

pub(crate) async fn post_assertion(
    client: &reqwest::Client,
    emulator: &Emulator,
    assertion: &str,
) -> reqwest::Response {
    client
        .post(emulator.token_uri())
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ])
        .send()
        .await
        .expect("token request")
}
