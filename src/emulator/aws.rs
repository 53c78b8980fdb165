//! The AWS side of workload identity federation, emulated: an EC2 instance
//! metadata service that answers only IMDSv2 sessions (`PUT
//! /latest/api/token`, then the region and the instance role's
//! credentials), and the check Google's STS has AWS make of an
//! `aws4_request` subject token: a SigV4-signed `GetCallerIdentity`, whose
//! signature is recomputed here with the role's secret.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{keys::random_key_id, lock, Shared};

const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// AWS refuses signed requests further than this from its clock.
const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// The emulated instance and its role.
#[derive(Debug)]
pub(crate) struct AwsInstance {
    pub(crate) zone: String,
    pub(crate) role: String,
    pub(crate) account: String,
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: String,
    pub(crate) session_token: String,
    sessions: HashSet<String>,
    /// The last subject token STS accepted, for tests to compare.
    pub(crate) last_subject_token: Option<String>,
}

impl AwsInstance {
    pub(crate) fn new() -> Self {
        Self {
            zone: "us-east-2b".into(),
            role: "token-broker-emulator-role".into(),
            account: "123456789012".into(),
            access_key_id: format!("ASIA{}", &random_key_id()[..16].to_ascii_uppercase()),
            secret_access_key: random_key_id(),
            session_token: format!("IQoJ{}", random_key_id()),
            sessions: HashSet::new(),
            last_subject_token: None,
        }
    }

    /// The role session's ARN: what Google's default attribute mapping
    /// makes the subject.
    pub(crate) fn arn(&self) -> String {
        format!(
            "arn:aws:sts::{}:assumed-role/{}/i-emulator",
            self.account, self.role
        )
    }
}

/// `PUT /latest/api/token`.
pub(super) async fn session(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if !ttl.is_some_and(|t| (1..=21600).contains(&t)) {
        return (StatusCode::BAD_REQUEST, "").into_response();
    }
    let token = format!("AQAE{}", random_key_id());
    lock(&shared.aws).sessions.insert(token.clone());
    shared.count(|stats| stats.aws_metadata += 1);
    token.into_response()
}

/// `GET /latest/meta-data/...`: IMDSv2 only.
pub(super) async fn metadata(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    shared.count(|stats| stats.aws_metadata += 1);
    let aws = lock(&shared.aws);
    let session = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    if !session.is_some_and(|s| aws.sessions.contains(s)) {
        return (StatusCode::UNAUTHORIZED, "").into_response();
    }
    let path = path.trim_end_matches('/');
    if path == "placement/availability-zone" {
        return aws.zone.clone().into_response();
    }
    if path == "iam/security-credentials" {
        return aws.role.clone().into_response();
    }
    if path == format!("iam/security-credentials/{}", aws.role) {
        let expiration =
            humantime::format_rfc3339_seconds(shared.clock.now() + Duration::from_secs(6 * 3600))
                .to_string();
        return axum::Json(serde_json::json!({
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": aws.access_key_id,
            "SecretAccessKey": aws.secret_access_key,
            "Token": aws.session_token,
            "Expiration": expiration,
        }))
        .into_response();
    }
    (StatusCode::NOT_FOUND, "").into_response()
}

/// Checks an `aws4_request` subject token as AWS would check the request it
/// describes; the caller's ARN on success, the reason otherwise.
pub(super) fn verify_subject_token(
    shared: &Shared,
    provider_audience: &str,
    token: &str,
) -> Result<String, String> {
    let decoded = url::form_urlencoded::parse(format!("t={token}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let request: Value = serde_json::from_str(&decoded)
        .map_err(|_| "the subject token is not a serialized request")?;
    let url = request["url"].as_str().ok_or("the request has no url")?;
    if request["method"] != "POST" {
        return Err("GetCallerIdentity must be a POST".into());
    }
    let parsed = url::Url::parse(url).map_err(|_| "the request url is not a URL")?;
    let query: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    if !query.contains(&("Action".into(), "GetCallerIdentity".into())) {
        return Err("the request is not GetCallerIdentity".into());
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    for item in request["headers"]
        .as_array()
        .ok_or("the request has no headers")?
    {
        let (Some(k), Some(v)) = (item["key"].as_str(), item["value"].as_str()) else {
            return Err("a request header is not {key, value}".into());
        };
        headers.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if header("x-goog-cloud-target-resource") != Some(provider_audience) {
        return Err("x-goog-cloud-target-resource does not name this provider".into());
    }
    let authorization = header("authorization").ok_or("the request is not signed")?;
    let date = header("x-amz-date").ok_or("the request has no x-amz-date")?;
    let signed_at = parse_amz_date(date).ok_or("x-amz-date is not YYYYMMDDTHHMMSSZ")?;
    let now = shared.clock.now();
    let skew = now
        .duration_since(signed_at)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or_default();
    if skew > MAX_SKEW {
        return Err(
            "Signature expired: the request was signed more than 15 minutes from now".into(),
        );
    }
    let aws = lock(&shared.aws);
    let credential = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .ok_or("the authorization header names no credential")?;
    if credential != aws.access_key_id {
        return Err("The security token included in the request is invalid".into());
    }
    let region = aws.zone.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let expected = resign(url, region, &aws, header("x-amz-security-token"), signed_at)?;
    if expected != authorization {
        return Err(
            "The request signature we calculated does not match the signature you provided".into(),
        );
    }
    Ok(aws.arn())
}

fn resign(
    url: &str,
    region: &str,
    aws: &AwsInstance,
    session_token: Option<&str>,
    at: SystemTime,
) -> Result<String, String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let identity = aws_credential_types::Credentials::new(
        aws.access_key_id.clone(),
        aws.secret_access_key.clone(),
        session_token.map(str::to_owned),
        None,
        "emulator",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new("POST", url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let authorization = instructions
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.to_owned());
    authorization.ok_or_else(|| "no signature computed".into())
}

/// `20260101T000000Z` as a time.
fn parse_amz_date(text: &str) -> Option<SystemTime> {
    if text.len() != 16 {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}
