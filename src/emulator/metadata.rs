//! The emulated GCE metadata server: the root ping, the default service
//! account's `identity`, `email`, directory and `token` routes, and the
//! project, instance and universe values libraries sometimes read
//! (`project/project-id`, `project/numeric-project-id`, `instance/zone`,
//! `instance/id`, `universe/universe-domain`). It behaves as PROTOCOLS.md §3
//! describes, so unmodified Google client libraries accept it when
//! `GCE_METADATA_HOST` points here.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::metadata_protocol::{account_and_leaf, Leaf, Query};

use super::{
    lock, log_call, ActiveFaults, Endpoint, IdTokenRequest, MetadataCacheKey, MintedTokenEntry,
    Shared,
};

const METADATA_FLAVOR: HeaderName = HeaderName::from_static("metadata-flavor");
const GOOGLE: HeaderValue = HeaderValue::from_static("Google");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Every metadata answer carries `Metadata-Flavor: Google`: clients use it to
/// tell the real server from anything else on that address.
fn respond(status: StatusCode, content_type: HeaderValue, body: String) -> Response {
    (
        status,
        [
            (METADATA_FLAVOR, GOOGLE),
            (header::CONTENT_TYPE, content_type),
        ],
        body,
    )
        .into_response()
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    respond(status, TEXT, body.into())
}

/// `GET /`: the ping google-auth uses to detect a metadata server.
pub(super) async fn root(uri: Uri) -> Response {
    let response = text(StatusCode::OK, "computeMetadata/\n");
    log_call(uri.path(), "", response.status());
    response
}

/// What a `/computeMetadata/...` path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `/computeMetadata/` and `/computeMetadata/v1/`.
    Listing(&'static str),
    /// `instance/service-accounts/`.
    ServiceAccounts,
    /// `instance/service-accounts/{account}/{leaf}`.
    Account {
        account: String,
        leaf: Leaf,
    },
    /// A project, instance or universe value: its path and its answer.
    Value(&'static str),
    Unknown,
}

/// The value paths the emulated instance answers.
const VALUE_PATHS: [&str; 5] = [
    "/v1/project/project-id",
    "/v1/project/numeric-project-id",
    "/v1/instance/zone",
    "/v1/instance/id",
    "/v1/universe/universe-domain",
];

fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/computeMetadata") else {
        return Route::Unknown;
    };
    match rest {
        "" | "/" => return Route::Listing("v1/\n"),
        "/v1" | "/v1/" => return Route::Listing("instance/\nproject/\nuniverse/\n"),
        value if VALUE_PATHS.contains(&value) => {
            return Route::Value(VALUE_PATHS.iter().find(|p| **p == value).expect("listed"))
        }
        "/v1/instance/service-accounts" | "/v1/instance/service-accounts/" => {
            return Route::ServiceAccounts
        }
        _ => {}
    }
    let Some(tail) = rest.strip_prefix("/v1/instance/service-accounts/") else {
        return Route::Unknown;
    };
    let (account, leaf) = account_and_leaf(tail);
    Route::Account { account, leaf }
}

/// Every `/computeMetadata...` request.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    shared.count(|stats| {
        *stats
            .metadata_paths
            .entry(uri.path().to_owned())
            .or_default() += 1
    });
    let route = route(uri.path());
    let query = Query::parse(uri.query());
    let (response, audience) = match route {
        Route::Account {
            account,
            leaf: Leaf::Identity,
        } => {
            let audience = query.audience.clone().unwrap_or_default();
            shared.count_call(Endpoint::Identity, &audience);
            let response = identity(&shared, &headers, &account, &query).await;
            (response, audience)
        }
        route => {
            let counts_as_email = matches!(
                &route,
                Route::Account {
                    leaf: Leaf::Email,
                    ..
                }
            ) || (matches!(
                &route,
                Route::Account {
                    leaf: Leaf::Directory,
                    ..
                }
            ) && query.recursive());
            if counts_as_email {
                shared.count_email();
            }
            let scopes = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .find(|(name, _)| name == "scopes")
                .map(|(_, value)| value.into_owned());
            (
                other(&shared, &headers, route, &query, scopes.as_deref()),
                String::new(),
            )
        }
    };
    log_call(uri.path(), &audience, response.status());
    response
}

/// The checks Google's server makes before looking at the path's meaning.
fn refuse_request(headers: &HeaderMap) -> Option<Response> {
    // SSRF protection: a request relayed by a proxy must not reach metadata.
    if headers.contains_key("x-forwarded-for") {
        return Some(text(
            StatusCode::FORBIDDEN,
            "Request had an X-Forwarded-For header and was rejected: the metadata server does not accept proxied requests.\n",
        ));
    }
    if headers.get(&METADATA_FLAVOR).map(HeaderValue::as_bytes) != Some(b"Google") {
        return Some(text(
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor: Google\".\n",
        ));
    }
    None
}

fn is_default_account(shared: &Shared, account: &str) -> bool {
    account == "default" || account == shared.default_email
}

fn unknown_account(account: &str) -> Response {
    text(
        StatusCode::NOT_FOUND,
        format!("Service account {account} is not available on this instance.\n"),
    )
}

async fn identity(shared: &Shared, headers: &HeaderMap, account: &str, query: &Query) -> Response {
    let faults = shared.faults_for(Endpoint::Identity);
    faults.delay().await;
    let response = identity_answer(shared, headers, account, query, &faults);
    let succeeded = response.status() == StatusCode::OK && !faults.corrupts_tokens();
    shared.count_outcome(Endpoint::Identity, succeeded);
    faults.deliver(response).await
}

impl ActiveFaults {
    /// Whether a 200 answer carries something other than a correct token
    /// delivered in time.
    fn corrupts_tokens(&self) -> bool {
        self.malformed || self.bends_tokens() || self.stall_after_headers || self.trickle.is_some()
    }
}

fn identity_answer(
    shared: &Shared,
    headers: &HeaderMap,
    account: &str,
    query: &Query,
    faults: &ActiveFaults,
) -> Response {
    if let Some(status) = faults.status {
        return text(status, fault_text(status));
    }
    if let Some(refusal) = refuse_request(headers) {
        return refusal;
    }
    if !is_default_account(shared, account) {
        return unknown_account(account);
    }
    let audience = match query.audience.as_deref() {
        Some(a) if !a.is_empty() => a,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "non-empty audience parameter required\n",
            )
        }
    };
    let full = match query.format.as_deref() {
        None | Some("standard") => false,
        Some("full") => true,
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "format must be \"standard\" or \"full\"\n",
            )
        }
    };
    let licenses = full
        && query
            .licenses
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if faults.malformed {
        return text(StatusCode::OK, "not-a-jwt");
    }

    let google = full.then(|| compute_engine_claim(shared, licenses));
    let request = IdTokenRequest {
        audience,
        subject: &shared.default_client_id,
        email: full.then_some(shared.default_email.as_str()),
        google,
    };
    let minted = match faults.metadata_cache {
        // Deliberately bad tokens are never cached: a real cache only ever
        // holds what the server issued normally.
        Some(min_left) if !faults.bends_tokens() => {
            let key: MetadataCacheKey = (audience.to_owned(), full.to_string(), licenses);
            let now = shared.clock.unix_seconds();
            let mut cache = lock(&shared.metadata_cache);
            match cache.get(&key) {
                Some(entry) if entry.exp.saturating_sub(now) >= min_left.as_secs() => {
                    Ok(entry.jwt.clone())
                }
                _ => shared.mint_id_token(&request, faults).map(|minted| {
                    cache.insert(
                        key,
                        MintedTokenEntry {
                            jwt: minted.jwt.clone(),
                            exp: minted.exp,
                        },
                    );
                    minted.jwt
                }),
            }
        }
        _ => shared.mint_id_token(&request, faults).map(|m| m.jwt),
    };
    match minted {
        Ok(jwt) => text(StatusCode::OK, jwt),
        Err(error) => {
            tracing::error!(%error, "emulator could not sign an identity token");
            text(StatusCode::INTERNAL_SERVER_ERROR, "Internal error\n")
        }
    }
}

/// The `google.compute_engine` claim of `format=full` tokens: fake but
/// shaped like GCE's.
fn compute_engine_claim(shared: &Shared, licenses: bool) -> serde_json::Value {
    let gce = &shared.compute_engine;
    let mut compute_engine = serde_json::json!({
        "instance_creation_timestamp": gce.instance_creation_timestamp,
        "instance_id": gce.instance_id,
        "instance_name": gce.instance_name,
        "project_id": gce.project_id,
        "project_number": gce.project_number,
        "zone": gce.zone,
    });
    if licenses {
        compute_engine["license_id"] = serde_json::json!([]);
    }
    serde_json::json!({ "compute_engine": compute_engine })
}

fn fault_text(status: StatusCode) -> String {
    format!(
        "{} {} (injected by the emulator)\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    )
}

/// Every route but `identity`; never faulted.
fn other(
    shared: &Shared,
    headers: &HeaderMap,
    route: Route,
    query: &Query,
    scopes: Option<&str>,
) -> Response {
    if let Some(refusal) = refuse_request(headers) {
        return refusal;
    }
    match route {
        Route::Listing(body) => text(StatusCode::OK, body),
        Route::ServiceAccounts => text(
            StatusCode::OK,
            format!("default/\n{}/\n", shared.default_email),
        ),
        Route::Value(path) => {
            shared.count(|stats| {
                *stats
                    .instance_values
                    .entry(format!("/computeMetadata{path}"))
                    .or_default() += 1;
            });
            let gce = &shared.compute_engine;
            let value = match path {
                "/v1/project/project-id" => gce.project_id.clone(),
                "/v1/project/numeric-project-id" => gce.project_number.to_string(),
                "/v1/instance/zone" => {
                    format!("projects/{}/zones/{}", gce.project_number, gce.zone)
                }
                "/v1/instance/id" => gce.instance_id.clone(),
                _ => "googleapis.com".to_owned(),
            };
            text(StatusCode::OK, value)
        }
        Route::Account { account, .. } if !is_default_account(shared, &account) => {
            unknown_account(&account)
        }
        Route::Account { leaf, .. } => match leaf {
            Leaf::Directory if query.recursive() => respond(
                StatusCode::OK,
                JSON,
                serde_json::json!({
                    "aliases": ["default"],
                    "email": shared.default_email,
                    "scopes": [CLOUD_PLATFORM_SCOPE],
                })
                .to_string(),
            ),
            Leaf::Directory => text(StatusCode::OK, "aliases\nemail\nidentity\nscopes\ntoken\n"),
            Leaf::Email => text(StatusCode::OK, shared.default_email.clone()),
            Leaf::Scopes => text(StatusCode::OK, format!("{CLOUD_PLATFORM_SCOPE}\n")),
            Leaf::Aliases => text(StatusCode::OK, "default\n"),
            // A real access token: IAM Credentials accepts it as the
            // default account's bearer.
            Leaf::Token => {
                shared.count(|stats| stats.metadata_token += 1);
                let scopes = scopes
                    .map(|s| {
                        s.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_else(|| vec![CLOUD_PLATFORM_SCOPE.to_owned()]);
                let (token, expires_in) =
                    shared.issue_access_token(&shared.default_email, scopes, None);
                respond(
                    StatusCode::OK,
                    JSON,
                    serde_json::json!({
                        "access_token": token,
                        "expires_in": expires_in,
                        "token_type": "Bearer",
                    })
                    .to_string(),
                )
            }
            Leaf::Identity | Leaf::Unknown => not_found(),
        },
        Route::Unknown => not_found(),
    }
}

fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Not Found\n")
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default/identity"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Identity
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/a%40b.com/email"),
            Route::Account {
                account: "a@b.com".into(),
                leaf: Leaf::Email
            }
        );
        assert_eq!(
            route("/computeMetadata/v1/instance/service-accounts/default"),
            Route::Account {
                account: "default".into(),
                leaf: Leaf::Directory
            }
        );
        assert_eq!(route("/computeMetadata/v1/instance/zone/x"), Route::Unknown);
    }

    #[tokio::test]
    async fn full_identity_token_verifies_with_published_keys() {
        let emulator = start().await;
        let client = client();
        let response = client
            .get(identity_url(&emulator, "https://api.example.com", "full"))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .expect("identity");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["metadata-flavor"], "Google");
        assert!(response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain"));
        let jwt = response.text().await.expect("body");

        // Verify through the JWKS, as a relying party would.
        let jwks: serde_json::Value = client
            .get(format!("{}/oauth2/v3/certs", emulator.base_url()))
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("jwks json");
        let jwk = &jwks["keys"][0];
        assert_eq!(jwk["kid"], emulator.issuer_key_id());
        assert_eq!(jwk["alg"], "RS256");
        let key = jsonwebtoken::DecodingKey::from_rsa_components(
            jwk["n"].as_str().expect("n"),
            jwk["e"].as_str().expect("e"),
        )
        .expect("key");
        let header = jsonwebtoken::decode_header(&jwt).expect("header");
        assert_eq!(
            header.kid.as_deref(),
            Some(emulator.issuer_key_id().as_str())
        );
        let claims = verify(&jwt, &key, "https://api.example.com");
        assert_eq!(claims["iss"], "https://accounts.google.com");
        let sub = claims["sub"].as_str().expect("sub");
        assert!(!sub.is_empty() && sub.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(claims["azp"], sub);
        assert_eq!(claims["email"], super::super::DEFAULT_ACCOUNT_EMAIL);
        assert_eq!(claims["email_verified"], true);
        assert_eq!(
            claims["google"]["compute_engine"]["project_id"],
            "token-broker-emulator"
        );
        assert_eq!(
            claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
            3600
        );

        // The v1 map publishes a certificate under the same kid.
        let certs: serde_json::Value = client
            .get(format!("{}/oauth2/v1/certs", emulator.base_url()))
            .send()
            .await
            .expect("certs")
            .json()
            .await
            .expect("certs json");
        let pem = certs[emulator.issuer_key_id()].as_str().expect("cert");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));

        // format=standard omits the identity claims.
        let jwt = get_identity(&client, &emulator, "https://api.example.com", "standard").await;
        let claims = verify(
            &jwt,
            &emulator.issuer_decoding_key(),
            "https://api.example.com",
        );
        assert!(claims.get("email").is_none() && claims.get("google").is_none());
    }

    #[tokio::test]
    async fn metadata_refuses_bad_requests() {
        let emulator = start().await;
        let client = client();
        let base = emulator.base_url();
        let flavored = |url: String| client.get(url).header("Metadata-Flavor", "Google");
        let identity = identity_url(&emulator, "aud", "full");

        let root = client.get(format!("{base}/")).send().await.expect("root");
        assert_eq!(root.status(), 200);
        assert_eq!(root.headers()["metadata-flavor"], "Google");

        let cases = [
            (client.get(identity.clone()), 403),
            (flavored(identity.clone()).header("X-Forwarded-For", "10.0.0.1"), 403),
            (
                flavored(format!(
                    "{base}/computeMetadata/v1/instance/service-accounts/default/identity"
                )),
                400,
            ),
            (flavored(identity_url(&emulator, "aud", "compact")), 400),
            (
                flavored(format!(
                    "{base}/computeMetadata/v1/instance/service-accounts/other@x.iam.gserviceaccount.com/identity?audience=a"
                )),
                404,
            ),
            (flavored(format!("{base}/computeMetadata/v1/instance/nothing")), 404),
        ];
        for (request, expected) in cases {
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), expected, "{response:?}");
            assert_eq!(response.headers()["metadata-flavor"], "Google");
        }

        let email = flavored(format!(
            "{base}/computeMetadata/v1/instance/service-accounts/default/email"
        ))
        .send()
        .await
        .expect("email");
        assert_eq!(
            email.text().await.expect("text"),
            super::super::DEFAULT_ACCOUNT_EMAIL
        );
        let info = flavored(format!(
            "{base}/computeMetadata/v1/instance/service-accounts/default/?recursive=true"
        ))
        .send()
        .await
        .expect("recursive");
        assert_eq!(info.headers()["content-type"], "application/json");
        let info: serde_json::Value = info.json().await.expect("json");
        assert_eq!(info["email"], super::super::DEFAULT_ACCOUNT_EMAIL);
        let stats = emulator.stats();
        assert_eq!(stats.email, 2);
        assert_eq!(stats.identity.total, 5);
        assert_eq!(stats.identity.failed, 5);
    }
}
