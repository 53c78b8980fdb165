//! The emulated OAuth2 token endpoint, `POST /token` (PROTOCOLS.md §2): the
//! jwt-bearer grant that exchanges a service account's self-signed assertion
//! for a Google-signed ID token. Assertions are checked as Google checks them,
//! in Google's order and with Google's error wording, so the broker's handling
//! of rejections is exercised against realistic answers.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::{lock, log_call, ActiveFaults, Endpoint, IdTokenRequest, Shared};

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Google refuses assertions living longer than an hour.
const MAX_ASSERTION_LIFETIME_SECS: i64 = 3600;
/// How far in the future an assertion's `iat` may lie (clock skew).
const MAX_IAT_SKEW_SECS: i64 = 300;

const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";
const BAD_SIGNATURE: &str = "Invalid JWT Signature.";

/// An OAuth2 error answer: `{"error", "error_description"}`.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    /// The answer for an injected error status, with the `error` code a
    /// client sees from Google for that status.
    fn injected(status: StatusCode) -> Self {
        let error = match status.as_u16() {
            400 => "invalid_grant",
            401 => "invalid_client",
            403 => "access_denied",
            429 => "rate_limit_exceeded",
            500..=599 => "internal_failure",
            _ => "invalid_request",
        };
        Self::new(
            status,
            error,
            format!(
                "{} (injected by the emulator)",
                status.canonical_reason().unwrap_or("Error")
            ),
        )
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CACHE_CONTROL, "no-store")],
            Json(serde_json::json!({
                "error": self.error,
                "error_description": self.description,
            })),
        )
            .into_response()
    }
}

/// The form fields of a token request; first occurrence wins.
#[derive(Debug, Default)]
struct TokenForm {
    grant_type: Option<String>,
    assertion: Option<String>,
}

impl TokenForm {
    fn parse(body: &[u8]) -> Self {
        let mut form = TokenForm::default();
        for (name, value) in url::form_urlencoded::parse(body) {
            let slot = match name.as_ref() {
                "grant_type" => &mut form.grant_type,
                "assertion" => &mut form.assertion,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.into_owned());
            }
        }
        form
    }
}

/// `POST /token`.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = TokenForm::parse(&body);
    // For the stats only: read before (and whether or not) it verifies.
    let audience = form
        .assertion
        .as_deref()
        .and_then(|a| unverified_claims(a).ok())
        .and_then(|claims| {
            claims
                .get("target_audience")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    shared.count_call(Endpoint::Token, &audience);
    let faults = shared.faults_for(Endpoint::Token);
    faults.delay().await;
    let response = match answer(&shared, &headers, &form, &faults) {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    let succeeded = response.status() == StatusCode::OK
        && !(faults.malformed
            || faults.missing_id_token
            || faults.non_json
            || faults.bends_tokens()
            || faults.stall_after_headers
            || faults.trickle.is_some());
    shared.count_outcome(Endpoint::Token, succeeded);
    log_call("/token", &audience, response.status());
    faults.deliver(response).await
}

fn answer(
    shared: &Shared,
    headers: &HeaderMap,
    form: &TokenForm,
    faults: &ActiveFaults,
) -> Result<Response, OAuthError> {
    // An injected status stands for a server in trouble: it answers before
    // looking at the request.
    if let Some(status) = faults.status {
        return Err(OAuthError::injected(status));
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let grant_type = form.grant_type.as_deref().unwrap_or("");
    if grant_type != JWT_BEARER {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("Invalid grant_type: {grant_type}"),
        ));
    }
    let assertion = match form.assertion.as_deref() {
        Some(a) if !a.is_empty() => a,
        _ => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: assertion",
            ))
        }
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let verified = verify_assertion(shared, host, assertion)?;

    if faults.non_json {
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<html><head><title>Error</title></head><body>The server is busy.</body></html>\n",
        )
            .into_response());
    }
    if faults.malformed {
        return Ok(Json(serde_json::json!({ "id_token": "not-a-jwt" })).into_response());
    }
    if faults.missing_id_token {
        return Ok(Json(serde_json::json!({
            "access_token": format!("ya29.emulator-{}", super::keys::random_key_id()),
            "expires_in": 3599,
            "token_type": "Bearer",
        }))
        .into_response());
    }
    let request = IdTokenRequest {
        audience: &verified.target_audience,
        subject: &verified.client_id,
        email: Some(&verified.client_email),
        google: None,
    };
    match shared.mint_id_token(&request, faults) {
        Ok(minted) => Ok((
            [(header::CACHE_CONTROL, "no-store")],
            Json(serde_json::json!({ "id_token": minted.jwt })),
        )
            .into_response()),
        Err(error) => {
            tracing::error!(%error, "emulator could not sign an ID token");
            Err(OAuthError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_failure",
                "Internal error signing the ID token",
            ))
        }
    }
}

/// What a valid assertion establishes.
#[derive(Debug)]
struct VerifiedAssertion {
    client_email: String,
    client_id: String,
    target_audience: String,
}

/// Checks an assertion as Google does, in Google's order: algorithm, account,
/// key and signature, subject, audience, lifetime, target audience.
fn verify_assertion(
    shared: &Shared,
    host: Option<&str>,
    assertion: &str,
) -> Result<VerifiedAssertion, OAuthError> {
    let not_a_jwt =
        || OAuthError::invalid_grant("Invalid JWT: the assertion is not a well-formed JWT");
    let mut segments = assertion.split('.');
    let (Some(header), Some(_), Some(_), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(not_a_jwt());
    };
    let header = decode_segment(header).map_err(|_| not_a_jwt())?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "RS256" {
        return Err(OAuthError::invalid_grant(format!(
            "Invalid JWT: the signing algorithm must be RS256, not {alg:?}"
        )));
    }
    let claims = unverified_claims(assertion).map_err(|_| not_a_jwt())?;
    let issuer = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    let account = lock(&shared.accounts).get(issuer).cloned();
    let Some(account) = account else {
        return Err(OAuthError::invalid_grant(
            "Invalid grant: account not found",
        ));
    };
    let key = header
        .get("kid")
        .and_then(Value::as_str)
        .and_then(|kid| account.decoding_key(kid))
        .ok_or_else(|| OAuthError::invalid_grant(BAD_SIGNATURE))?;

    // Only the signature is left to jsonwebtoken; every claim check below is
    // Google's, with Google's messages, against the emulator's clock.
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Map<String, Value>>(assertion, &key, &validation)
        .map_err(|_| OAuthError::invalid_grant(BAD_SIGNATURE))?
        .claims;

    if let Some(subject) = claims.get("sub") {
        if subject.as_str() != Some(issuer) {
            return Err(OAuthError::invalid_grant(
                "Invalid JWT: sub must equal iss; the emulator does not support domain-wide delegation",
            ));
        }
    }

    let accepted = shared.accepted_token_audiences(host);
    let audience = claims.get("aud").and_then(Value::as_str);
    if !audience.is_some_and(|aud| accepted.iter().any(|a| a == aud)) {
        return Err(OAuthError::invalid_grant(format!(
            "Invalid JWT: Failed audience check. The right audience is {}",
            shared.token_url
        )));
    }

    let iat = claims.get("iat").and_then(numeric_date);
    let exp = claims.get("exp").and_then(numeric_date);
    let now = i64::try_from(shared.clock.unix_seconds()).unwrap_or(i64::MAX);
    let (Some(iat), Some(exp)) = (iat, exp) else {
        return Err(OAuthError::invalid_grant(SHORT_LIVED));
    };
    if exp.saturating_sub(iat) > MAX_ASSERTION_LIFETIME_SECS
        || iat > now.saturating_add(MAX_IAT_SKEW_SECS)
        || exp < now
    {
        return Err(OAuthError::invalid_grant(SHORT_LIVED));
    }

    let target_audience = match claims.get("target_audience").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => t.to_owned(),
        // Google's answer when an assertion asks for neither an access token
        // (scope) nor an ID token (target_audience).
        _ => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.",
            ))
        }
    };

    Ok(VerifiedAssertion {
        client_email: issuer.to_owned(),
        client_id: account.client_id,
        target_audience,
    })
}

/// A JWT `NumericDate`: seconds, possibly written as a float.
fn numeric_date(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && f.abs() < 1e15)
            .map(|f| f.floor() as i64)
    })
}

/// Decodes one base64url JWT segment into a JSON object.
fn decode_segment(segment: &str) -> Result<Map<String, Value>, ()> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| ())?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(()),
    }
}

/// The payload of a JWT, not yet verified.
fn unverified_claims(jwt: &str) -> Result<Map<String, Value>, ()> {
    let payload = jwt.split('.').nth(1).ok_or(())?;
    decode_segment(payload)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{Faults, GOOGLE_TOKEN_URL};
    use super::*;

    #[tokio::test]
    async fn valid_assertion_gets_an_id_token() {
        let emulator = start().await;
        let key = register_key(&emulator, "deployer@proj.iam.gserviceaccount.com");
        let client = client();
        for aud in [emulator.token_uri(), GOOGLE_TOKEN_URL.to_owned()] {
            let claims = AssertionClaims::new(&key, &aud, "https://svc.example.com").to_json();
            let response = post_assertion(&client, &emulator, &sign_assertion(&key, &claims)).await;
            assert_eq!(response.status(), 200);
            assert!(response.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("application/json"));
            let body: Value = response.json().await.expect("json");
            let id_token = body["id_token"].as_str().expect("id_token");
            let claims = verify(
                id_token,
                &emulator.issuer_decoding_key(),
                "https://svc.example.com",
            );
            assert_eq!(claims["iss"], "https://accounts.google.com");
            assert_eq!(claims["email"], "deployer@proj.iam.gserviceaccount.com");
            assert_eq!(claims["email_verified"], true);
            assert_eq!(claims["sub"], key.registration.client_id);
            assert_eq!(claims["azp"], key.registration.client_id);
            assert_eq!(
                claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
                3600
            );
        }
        let stats = emulator.stats();
        assert_eq!(stats.token.total, 2);
        assert_eq!(stats.token.succeeded, 2);
        assert_eq!(stats.token.by_audience["https://svc.example.com"], 2);
    }

    #[tokio::test]
    async fn bad_assertions_are_rejected_as_google_would() {
        let emulator = start().await;
        let email = "deployer@proj.iam.gserviceaccount.com";
        let key = register_key(&emulator, email);
        // Another key pair: same kid and account, so only the signature is wrong.
        let impostor = generate_key(email);
        let client = client();
        let token_uri = emulator.token_uri();
        let now = unix_now();
        let good = || AssertionClaims::new(&key, &token_uri, "https://svc.example.com");

        let mut cases: Vec<(&str, String, &str, &str)> = Vec::new();
        let mut add = |name, assertion, error, description| {
            cases.push((name, assertion, error, description));
        };
        add(
            "wrong kid",
            sign_assertion_with_kid(&key, &good().to_json(), "0123456789abcdef"),
            "invalid_grant",
            "Invalid JWT Signature.",
        );
        let mut unknown = good();
        unknown.iss = "nobody@proj.iam.gserviceaccount.com".into();
        unknown.sub = unknown.iss.clone();
        add(
            "unknown account",
            sign_assertion(&key, &unknown.to_json()),
            "invalid_grant",
            "Invalid grant: account not found",
        );
        add(
            "bad signature",
            sign_assertion_with_kid(&impostor, &good().to_json(), &key.registration.key_id),
            "invalid_grant",
            "Invalid JWT Signature.",
        );
        let mut expired = good();
        expired.iat = now - 7200;
        expired.exp = now - 3600;
        add(
            "expired",
            sign_assertion(&key, &expired.to_json()),
            "invalid_grant",
            SHORT_LIVED,
        );
        let mut too_long = good();
        too_long.exp = too_long.iat + 3601;
        add(
            "too long",
            sign_assertion(&key, &too_long.to_json()),
            "invalid_grant",
            SHORT_LIVED,
        );
        let mut future = good();
        future.iat = now + 600;
        future.exp = now + 1200;
        add(
            "issued in the future",
            sign_assertion(&key, &future.to_json()),
            "invalid_grant",
            SHORT_LIVED,
        );
        let mut wrong_aud = good();
        wrong_aud.aud = "https://example.com/token".into();
        add(
            "wrong aud",
            sign_assertion(&key, &wrong_aud.to_json()),
            "invalid_grant",
            "Invalid JWT: Failed audience check",
        );
        let mut no_target = good().to_json();
        no_target
            .as_object_mut()
            .expect("object")
            .remove("target_audience");
        add(
            "missing target_audience",
            sign_assertion(&key, &no_target),
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        );
        let mut other_sub = good();
        other_sub.sub = "user@example.com".into();
        add(
            "sub differs",
            sign_assertion(&key, &other_sub.to_json()),
            "invalid_grant",
            "sub must equal iss",
        );

        for (name, assertion, error, description) in cases {
            let response = post_assertion(&client, &emulator, &assertion).await;
            assert_eq!(response.status(), 400, "{name}");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"], error, "{name}: {body}");
            let got = body["error_description"].as_str().expect("description");
            assert!(got.contains(description), "{name}: {got}");
        }

        // Form-level problems.
        let signed = sign_assertion(&key, &good().to_json());
        let response = client
            .post(emulator.token_uri())
            .form(&[("grant_type", "client_credentials"), ("assertion", &signed)])
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "unsupported_grant_type");
        assert_eq!(
            body["error_description"],
            "Invalid grant_type: client_credentials"
        );
        let response = client
            .post(emulator.token_uri())
            .form(&[("grant_type", JWT_BEARER)])
            .send()
            .await
            .expect("send");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"], "invalid_request");

        let stats = emulator.stats();
        assert_eq!(stats.token.total, 11);
        assert_eq!(stats.token.failed, 11);
        assert_eq!(stats.token.succeeded, 0);
    }

    #[tokio::test]
    async fn token_faults_fail_then_recover() {
        let emulator = start().await;
        let key = register_key(&emulator, "sa@proj.iam.gserviceaccount.com");
        let client = client();
        let claims = AssertionClaims::new(&key, &emulator.token_uri(), "aud-1").to_json();
        let assertion = sign_assertion(&key, &claims);

        emulator.set_faults(Faults {
            status: Some(503),
            fail_next: Some(2),
            endpoint: Some("token".into()),
            ..Faults::default()
        });
        for _ in 0..2 {
            let response = post_assertion(&client, &emulator, &assertion).await;
            assert_eq!(response.status(), 503);
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"], "internal_failure");
        }
        let response = post_assertion(&client, &emulator, &assertion).await;
        assert_eq!(response.status(), 200);

        // Each kind of broken 200.
        let broken = [
            (
                Faults {
                    malformed: true,
                    ..Faults::default()
                },
                Some(serde_json::json!({"id_token": "not-a-jwt"})),
            ),
            (
                Faults {
                    non_json: true,
                    ..Faults::default()
                },
                None,
            ),
        ];
        for (faults, expected) in broken {
            emulator.set_faults(faults);
            let response = post_assertion(&client, &emulator, &assertion).await;
            assert_eq!(response.status(), 200);
            let text = response.text().await.expect("body");
            match expected {
                Some(json) => assert_eq!(serde_json::from_str::<Value>(&text).expect("json"), json),
                None => assert!(serde_json::from_str::<Value>(&text).is_err()),
            }
        }
        emulator.set_faults(Faults {
            missing_id_token: true,
            ..Faults::default()
        });
        let body: Value = post_assertion(&client, &emulator, &assertion)
            .await
            .json()
            .await
            .expect("json");
        assert!(body.get("id_token").is_none() && body.get("access_token").is_some());

        emulator.clear_faults();
        let stats = emulator.stats();
        assert_eq!(stats.token.total, 6);
        assert_eq!(stats.token.succeeded, 1);
        assert_eq!(stats.token.failed, 5);
        assert_eq!(stats.token.by_audience["aud-1"], 6);
    }
}
