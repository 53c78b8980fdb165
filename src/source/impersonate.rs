//! `source = "impersonate"` (PROTOCOLS.md §4): another identity's credential
//! (its cloud-platform access token) asks IAM Credentials to mint ID tokens
//! for a service account, through optional delegates. No key of the target
//! account exists on the machine.
//!
//! [`IamCredentials`] is the IAM hop, shared with `external_account`: it
//! takes the bearer from the cache engine (the base identity's access token,
//! keyed by identity and scopes, [`super::access::Bearer`]), and when IAM
//! answers 401 it drops that token once and retries with a fresh one.

use std::{sync::Arc, time::Duration};

use reqwest::StatusCode;
use serde_json::Value;

use super::{
    access::{
        AccessFetcher, AccessFuture, AccessOf, AccessToken, AccessTokens, Bearer, EngineLink,
    },
    http_client, record_hop, sanitize_upstream_text, send_once, Answer, FetchFuture, IdTokenSource,
    SourceError,
};
use crate::{clock::Clock, config::AccountFrom, domain::SourceKind, token::IdToken};

/// IAM Credentials' public endpoint.
pub const DEFAULT_IAM_ENDPOINT: &str = "https://iamcredentials.googleapis.com";
/// Permissions IAM Credentials names when it refuses.
const KNOWN_PERMISSIONS: [&str; 2] = [
    "iam.serviceAccounts.getOpenIdToken",
    "iam.serviceAccounts.getAccessToken",
];
/// Lifetime asked of `generateAccessToken` (Google's maximum by default).
const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The account and origin of a `.../serviceAccounts/EMAIL:generateAccessToken`
/// URL (credential files name the impersonated account this way).
pub(crate) fn account_from_impersonation_url(
    text: &str,
    field: &str,
) -> Result<(String, String), String> {
    let url = crate::domain::upstream_url::parse_https_or_loopback(text, field)?;
    let account = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .and_then(|last| last.strip_suffix(":generateAccessToken"))
        .map(|email| {
            url::form_urlencoded::parse(format!("e={email}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .filter(|email| email.contains('@'))
        .ok_or_else(|| {
            format!("field `{field}` ({text}) does not end in /serviceAccounts/EMAIL:generateAccessToken")
        })?;
    Ok((account, url.origin().ascii_serialization()))
}

/// The IAM Credentials API as one identity uses it.
pub(crate) struct IamCredentials {
    client: reqwest::Client,
    base: url::Url,
    upstream: String,
    clock: Clock,
    identity: &'static str,
    /// The `lifetime` asked of `generateAccessToken`.
    access_lifetime: Duration,
}

/// What the broker asks IAM for.
enum Mint<'a> {
    IdToken {
        audience: &'a str,
        include_email: bool,
    },
    AccessToken {
        scopes: &'a str,
    },
}

impl IamCredentials {
    pub(crate) fn new(endpoint: &str, identity: &str, clock: Clock) -> Result<Self, String> {
        let base = url::Url::parse(endpoint.trim_end_matches('/'))
            .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
        Ok(Self {
            client: http_client()?,
            upstream: format!("IAM Credentials at {}", endpoint.trim_end_matches('/')),
            base,
            clock,
            identity: crate::metrics::identity_label(identity),
            access_lifetime: ACCESS_TOKEN_LIFETIME,
        })
    }

    /// Asks `generateAccessToken` for tokens living `lifetime` (an
    /// `external_account` file's `token_lifetime_seconds`) instead of an hour.
    pub(crate) fn with_access_lifetime(mut self, lifetime: Duration) -> Self {
        self.access_lifetime = lifetime;
        self
    }

    pub(crate) fn upstream(&self) -> &str {
        &self.upstream
    }

    /// `generateIdToken` for `account`.
    pub(crate) async fn generate_id_token(
        &self,
        bearer: &Bearer<'_>,
        account: &str,
        delegates: &[String],
        audience: &str,
        include_email: bool,
    ) -> Result<IdToken, SourceError> {
        let mint = Mint::IdToken {
            audience,
            include_email,
        };
        let body = self.call(bearer, account, delegates, &mint).await?;
        let token = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_owned))
            .ok_or_else(|| SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: "no `token` in the generateIdToken answer".into(),
            })?;
        IdToken::parse(&token, audience, self.clock.now())
            .map_err(|e| SourceError::invalid_token(&self.upstream, e))
    }

    /// `generateAccessToken` for `account`.
    pub(crate) async fn generate_access_token(
        &self,
        bearer: &Bearer<'_>,
        account: &str,
        delegates: &[String],
        scopes: &str,
    ) -> Result<AccessToken, SourceError> {
        let body = self
            .call(bearer, account, delegates, &Mint::AccessToken { scopes })
            .await?;
        let invalid = |message: &str| SourceError::InvalidResponse {
            upstream: self.upstream.clone(),
            message: format!("generateAccessToken: {message}"),
        };
        let json: Value = serde_json::from_slice(&body).map_err(|_| invalid("not JSON"))?;
        let token = json
            .get("accessToken")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("no `accessToken`"))?;
        let expires_at = json
            .get("expireTime")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .ok_or_else(|| invalid("no RFC 3339 `expireTime`"))?;
        Ok(AccessToken::new(
            token.to_owned(),
            self.clock.now(),
            expires_at,
        ))
    }

    /// One IAM call with the bearer's token; a 401 drops that token and
    /// tries once more with a fresh one.
    async fn call(
        &self,
        bearer: &Bearer<'_>,
        account: &str,
        delegates: &[String],
        mint: &Mint<'_>,
    ) -> Result<Vec<u8>, SourceError> {
        let verb = match mint {
            Mint::IdToken { .. } => "generateIdToken",
            Mint::AccessToken { .. } => "generateAccessToken",
        };
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| SourceError::InvalidResponse {
                upstream: self.upstream.clone(),
                message: "the IAM endpoint cannot be a base URL".into(),
            })?
            .pop_if_empty()
            .extend([
                "v1",
                "projects",
                "-",
                "serviceAccounts",
                &format!("{account}:{verb}"),
            ]);
        let delegates: Vec<String> = delegates
            .iter()
            .map(|d| format!("projects/-/serviceAccounts/{d}"))
            .collect();
        let body = match mint {
            Mint::IdToken {
                audience,
                include_email,
            } => serde_json::json!({
                "audience": audience,
                "includeEmail": include_email,
                "delegates": delegates,
            }),
            Mint::AccessToken { scopes } => serde_json::json!({
                "scope": scopes.split(' ').collect::<Vec<_>>(),
                "lifetime": format!("{}s", self.access_lifetime.as_secs()),
                "delegates": delegates,
            }),
        };
        let mut result = Err(SourceError::Unavailable {
            upstream: self.upstream.clone(),
            message: "not attempted".into(),
            retry_after: None,
        });
        for pass in 0..2 {
            let token = bearer.get().await.map_err(|e| via(e, bearer.description))?;
            result = self.attempt(&url, &token, &body, account, verb).await;
            let unauthorized = matches!(&result, Err(SourceError::Rejected { status: 401, .. }));
            if unauthorized && pass == 0 {
                tracing::info!(
                    identity = self.identity,
                    bearer = bearer.description,
                    "IAM Credentials refused the bearer token (HTTP 401); fetching a new one"
                );
                bearer.invalidate(&token);
                continue;
            }
            break;
        }
        record_hop(self.identity, "iam", &result);
        result
    }

    /// One IAM call: the 200 body, or why not (with any `Retry-After`).
    async fn attempt(
        &self,
        url: &url::Url,
        token: &AccessToken,
        body: &Value,
        account: &str,
        verb: &str,
    ) -> Result<Vec<u8>, SourceError> {
        let unavailable =
            |message: String, retry_after: Option<Duration>| SourceError::Unavailable {
                upstream: self.upstream.clone(),
                message,
                retry_after,
            };
        let Answer {
            status,
            body: bytes,
            retry_after: wait,
        } = send_once(
            self.client
                .post(url.clone())
                .bearer_auth(token.expose())
                .json(body),
            &self.upstream,
            &self.clock,
        )
        .await?;
        if status == StatusCode::OK {
            return Ok(bytes.to_vec());
        }
        let raw = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error")?.get("message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        // Upstream text is sanitized, which blanks dotted words as long as a
        // permission name; a permission IAM names is one of a known few, so
        // it is said again from that list.
        let permission = KNOWN_PERMISSIONS
            .iter()
            .find(|p| raw.contains(*p))
            .map(|p| format!(" (missing permission: {p})"))
            .unwrap_or_default();
        let google = format!("{}{permission}", sanitize_upstream_text(&raw));
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(unavailable(format!("HTTP {status}: {google}"), wait));
        }
        Err(SourceError::Rejected {
            upstream: self.upstream.clone(),
            status: status.as_u16(),
            message: format!("{verb} for {account}: {google}"),
        })
    }
}

/// A base's error, naming the hop it came from.
fn via(err: SourceError, hop: &str) -> SourceError {
    match err {
        SourceError::Rejected {
            upstream,
            status,
            message,
        } => SourceError::Rejected {
            upstream: format!("{upstream} (for the access token of {hop})"),
            status,
            message,
        },
        SourceError::Unavailable {
            upstream,
            message,
            retry_after,
        } => SourceError::Unavailable {
            upstream: format!("{upstream} (for the access token of {hop})"),
            message,
            retry_after,
        },
        SourceError::InvalidResponse { upstream, message } => SourceError::InvalidResponse {
            upstream: format!("{upstream} (for the access token of {hop})"),
            message,
        },
    }
}

/// Mints ID tokens for `service_account` with a base identity's credential;
/// or, for a per-workload identity (`service_account_from`), for the account
/// each request names ([`IdTokenSource::fetch_as`]). The base's access
/// token is one cache entry however many accounts it impersonates.
pub struct ImpersonateSource {
    target: Target,
}

/// What both token kinds of an impersonated identity need.
struct Target {
    iam: IamCredentials,
    /// The identity the engine holds this one's bearer under: the base's
    /// own name, or this identity's when the base is no identity of its own
    /// (a credential file's `source_credentials`).
    bearer_identity: String,
    bearer_of: AccessOf,
    link: EngineLink,
    base_name: String,
    base_hop: String,
    base: Arc<dyn IdTokenSource>,
    /// `None` for a per-workload identity.
    service_account: Option<String>,
    account_from: Option<AccountFrom>,
    delegates: Vec<String>,
    include_email: bool,
}

impl Target {
    /// The fixed account; a per-workload identity has none of its own.
    fn own_account(&self) -> Result<&str, SourceError> {
        self.service_account
            .as_deref()
            .ok_or_else(|| SourceError::Rejected {
                upstream: self.iam.upstream.clone(),
                status: 400,
                message: format!(
                    "this identity mints as the account each caller's {} names, and no caller \
                     account was given",
                    self.account_from
                        .map_or("annotation", AccountFrom::annotation)
                ),
            })
    }

    fn bearer(&self) -> Result<Bearer<'_>, SourceError> {
        let fetcher = self
            .base
            .access()
            .ok_or_else(|| SourceError::InvalidResponse {
                upstream: self.iam.upstream.clone(),
                message: format!("{} cannot mint access tokens", self.base_hop),
            })?;
        Ok(Bearer {
            link: &self.link,
            identity: &self.bearer_identity,
            of: self.bearer_of,
            fetcher,
            description: &self.base_hop,
        })
    }
}

/// The settings of one impersonated identity.
pub struct ImpersonateOptions<'a> {
    pub identity: &'a str,
    pub base_name: &'a str,
    /// Whether the base is a configured identity (its access tokens are
    /// held under its name) or only the credential under this one.
    pub named_base: bool,
    pub base: Arc<dyn IdTokenSource>,
    /// The account to mint as; `None` with `account_from`.
    pub service_account: Option<&'a str>,
    /// Per workload: where each request's account comes from.
    pub account_from: Option<AccountFrom>,
    pub delegates: &'a [String],
    pub include_email: bool,
    pub iam_endpoint: &'a str,
}

impl ImpersonateSource {
    pub fn new(options: ImpersonateOptions<'_>, clock: Clock) -> Result<Self, String> {
        if options.base.access().is_none() {
            return Err(format!(
                "identity {:?} cannot mint access tokens, so it cannot be a base",
                options.base_name
            ));
        }
        let (bearer_identity, bearer_of) = if options.named_base {
            (options.base_name, AccessOf::Identity)
        } else {
            (options.identity, AccessOf::Base)
        };
        let target = Target {
            bearer_identity: bearer_identity.to_owned(),
            bearer_of,
            link: EngineLink::default(),
            iam: IamCredentials::new(options.iam_endpoint, options.identity, clock)?,
            base_name: options.base_name.to_owned(),
            base_hop: format!("base identity {:?}", options.base_name),
            base: options.base,
            service_account: options.service_account.map(str::to_owned),
            account_from: options.account_from,
            delegates: options.delegates.to_vec(),
            include_email: options.include_email,
        };
        Ok(Self { target })
    }
}

impl IdTokenSource for ImpersonateSource {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            let t = &self.target;
            t.iam
                .generate_id_token(
                    &t.bearer()?,
                    t.own_account()?,
                    &t.delegates,
                    audience,
                    t.include_email,
                )
                .await
        })
    }

    fn account_from(&self) -> Option<AccountFrom> {
        self.target.account_from
    }

    fn fetch_as<'a>(&'a self, account: &'a str, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            let t = &self.target;
            // The same bearer (the base's one cached access token) for
            // every account: only the target of the IAM call changes.
            t.iam
                .generate_id_token(
                    &t.bearer()?,
                    account,
                    &t.delegates,
                    audience,
                    t.include_email,
                )
                .await
        })
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Impersonate
    }

    fn upstream(&self) -> &str {
        self.target.iam.upstream()
    }

    fn account(&self) -> Option<&str> {
        self.target.service_account.as_deref()
    }

    /// The base's project and machine: an impersonating broker runs where
    /// its base does.
    fn instance(&self) -> super::instance::InstanceFacts {
        self.target.base.instance()
    }

    fn fingerprint(&self) -> String {
        let t = &self.target;
        format!(
            "impersonate|{}|{:?}|{:?}|{:?}|{}|base {}=[{}]",
            t.iam.upstream(),
            t.service_account,
            t.account_from,
            t.delegates,
            t.include_email,
            t.base_name,
            t.base.fingerprint()
        )
    }

    fn access(&self) -> Option<&dyn AccessFetcher> {
        Some(&self.target)
    }

    fn base_access(&self) -> Option<&dyn AccessFetcher> {
        match self.target.bearer_of {
            AccessOf::Base => self.target.base.access(),
            AccessOf::Identity => None,
        }
    }

    fn attach(&self, tokens: &Arc<dyn AccessTokens>) {
        self.target.link.attach(tokens.clone());
    }

    fn chain(&self) -> Option<String> {
        let t = &self.target;
        let base = t
            .base
            .chain()
            .unwrap_or_else(|| t.base.upstream().to_owned());
        let account = match (&t.service_account, t.account_from) {
            (Some(account), _) => account.clone(),
            (None, from) => format!(
                "the account each calling pod's {} names",
                from.map_or("annotation", AccountFrom::annotation)
            ),
        };
        let mut out = format!(
            "impersonate {} via {} ({base}) through {}",
            account,
            t.base_name,
            t.iam.upstream()
        );
        if !t.delegates.is_empty() {
            out.push_str(&format!(", delegates [{}]", t.delegates.join(", ")));
        }
        Some(out)
    }
}

impl AccessFetcher for Target {
    fn fetch_access<'a>(&'a self, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            self.iam
                .generate_access_token(
                    &self.bearer()?,
                    self.own_account()?,
                    &self.delegates,
                    scopes,
                )
                .await
        })
    }

    fn fetch_access_as<'a>(&'a self, account: &'a str, scopes: &'a str) -> AccessFuture<'a> {
        Box::pin(async move {
            // As for ID tokens: the base's one cached access token is the
            // bearer for every account; only the IAM call's target changes.
            self.iam
                .generate_access_token(&self.bearer()?, account, &self.delegates, scopes)
                .await
        })
    }
}
