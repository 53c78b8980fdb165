//! The metadata endpoint's paths beyond ID tokens (issue 15.2), answered as
//! Google's metadata server answers them, for libraries that ask more than
//! `identity`: access tokens (`.../token`), the account's `scopes` and
//! `aliases`, and the project, instance and universe values
//! (`project/project-id`, `project/numeric-project-id`, `instance/zone`,
//! `instance/id`, `universe/universe-domain`), with directory listings,
//! `?recursive=true` and `?alt=json|text`.
//!
//! How Google's server renders (and so this one): a value is plain text,
//! `Content-Type: application/text`, or a JSON value with `?alt=json`
//! (numbers unquoted); a list is one item a line; a directory lists its
//! children one a line (directories with a trailing `/`), or with
//! `?recursive=true` is a JSON object of everything under it (keys
//! camelCased: `numericProjectId`), or with `?recursive=true&alt=text` one
//! `path value` line per value. Unknown paths and unknown values are 404 with
//! Google's page; the operator finds why in the request's log line.
//!
//! Where a value comes from, first found wins: the endpoint's config
//! (`metadata_endpoint.project_id`, ...), the metadata server when the
//! served identity's base is `metadata` (one of five fixed paths, fetched
//! once and kept: see [`crate::source::instance`]), the key file's
//! `project_id` (for `project-id`), `googleapis.com` (for the universe).

use std::{collections::HashMap, time::Duration};

use axum::{
    http::{HeaderValue, StatusCode},
    response::Response,
};
use tokio::time::Instant;

use super::{
    metadata_endpoint::{respond, timed_out, upstream_failure, EndpointState, Outcome, Refusal},
    peer::PeerCredentials,
    workload_account::{self, Record},
};
use crate::{
    cache::{CacheError, CacheKey},
    config::MetadataEndpointSettings,
    domain::LogText,
    metadata_protocol::{Leaf, Query},
    source::{
        access::{AccessOf, CLOUD_PLATFORM_SCOPE},
        instance::InstanceValue,
    },
};

/// Google's content type for plain values, listings and ID tokens.
pub(super) const APPLICATION_TEXT: HeaderValue = HeaderValue::from_static("application/text");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=UTF-8");
/// The universe every identity the broker can hold lives in.
const DEFAULT_UNIVERSE: &str = "googleapis.com";
/// After a failed pass-through fetch, requests for it get the same error
/// for this long instead of each making another upstream call.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
const V1: &str = "/computeMetadata/v1";

/// A path under `/computeMetadata/v1/` outside the service accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tree {
    V1,
    Instance,
    Project,
    Universe,
    Value(InstanceValue),
}

/// The [`Tree`] `path` names, if any. A directory with or without its
/// trailing slash (Google's server redirects to it; clients ask both).
pub(super) fn tree_route(path: &str) -> Option<Tree> {
    let rest = path.strip_prefix(V1)?;
    Some(match rest {
        "" | "/" => Tree::V1,
        "/instance" | "/instance/" => Tree::Instance,
        "/project" | "/project/" => Tree::Project,
        "/universe" | "/universe/" => Tree::Universe,
        _ => {
            let value = InstanceValue::ALL.into_iter().find(|v| v.path() == path)?;
            Tree::Value(value)
        }
    })
}

/// What is rendered: a value, a list, or a directory.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Value {
        text: String,
        numeric: bool,
    },
    List(Vec<String>),
    /// Children: (name in the path, key in JSON, node).
    Dir(Vec<(String, String, Node)>),
}

impl Node {
    fn text(text: impl Into<String>) -> Node {
        Node::Value {
            text: text.into(),
            numeric: false,
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Node::Value {
                text,
                numeric: true,
            } => text
                .parse::<u64>()
                .map_or_else(|_| text.clone().into(), serde_json::Value::from),
            Node::Value { text, .. } => text.clone().into(),
            Node::List(items) => items.clone().into(),
            Node::Dir(children) => serde_json::Value::Object(
                children
                    .iter()
                    .map(|(_, key, node)| (key.clone(), node.json()))
                    .collect(),
            ),
        }
    }

    /// `path value` lines, as `?recursive=true&alt=text` answers.
    fn flatten(&self, prefix: &str, out: &mut String) {
        match self {
            Node::Value { text, .. } => out.push_str(&format!("{prefix} {text}\n")),
            Node::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&format!("{prefix}/{i} {item}\n"));
                }
            }
            Node::Dir(children) => {
                for (name, _, node) in children {
                    let path = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}/{name}")
                    };
                    node.flatten(&path, out);
                }
            }
        }
    }
}

/// `?alt=`: how to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alt {
    Text,
    Json,
}

fn alt(query: &Query) -> Result<Option<Alt>, Refusal> {
    match query.alt.as_deref() {
        None => Ok(None),
        Some("json") => Ok(Some(Alt::Json)),
        Some("text") => Ok(Some(Alt::Text)),
        Some(other) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "alt {} is not supported: use alt=json or alt=text",
                LogText::new(other)
            ),
        )),
    }
}

fn render_value(node: &Node, alt: Option<Alt>) -> Response {
    match (node, alt) {
        (_, Some(Alt::Json)) => respond(StatusCode::OK, JSON, node.json().to_string()),
        (Node::Value { text, .. }, _) => respond(StatusCode::OK, APPLICATION_TEXT, text.clone()),
        (Node::List(items), _) => {
            let body: String = items.iter().map(|i| format!("{i}\n")).collect();
            respond(StatusCode::OK, APPLICATION_TEXT, body)
        }
        (Node::Dir(_), _) => {
            let mut body = String::new();
            node.flatten("", &mut body);
            respond(StatusCode::OK, APPLICATION_TEXT, body)
        }
    }
}

/// A directory without `recursive`: its children's names, one a line
/// (directories with a trailing `/`), or a JSON array with `alt=json`.
fn render_listing(names: &[&str], alt: Option<Alt>) -> Response {
    match alt {
        Some(Alt::Json) => respond(
            StatusCode::OK,
            JSON,
            serde_json::Value::from(names.to_vec()).to_string(),
        ),
        _ => {
            let body: String = names.iter().map(|n| format!("{n}\n")).collect();
            respond(StatusCode::OK, APPLICATION_TEXT, body)
        }
    }
}

/// A directory with `recursive=true`: JSON unless `alt=text`.
fn render_recursive(node: &Node, alt: Option<Alt>) -> Response {
    render_value(node, Some(alt.unwrap_or(Alt::Json)))
}

/// Google's 404: its page, whatever was asked for. `why` goes to the log.
pub(super) fn not_found(path: &str, why: impl Into<String>) -> Refusal {
    let escaped: String = path
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c if c.is_control() => String::new(),
            c => c.to_string(),
        })
        .take(512)
        .collect();
    let page = format!(
        "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <meta name=viewport \
         content=\"initial-scale=1, minimum-scale=1, width=device-width\">\n  <title>Error 404 \
         (Not Found)!!1</title>\n  <p><b>404.</b> <ins>That\u{2019}s an error.</ins>\n  <p>The \
         requested URL <code>{escaped}</code> was not found on this server.  \
         <ins>That\u{2019}s all we know.</ins>\n"
    );
    let mut refusal = Refusal::new(StatusCode::NOT_FOUND, why);
    refusal.page = Some((HTML, page));
    refusal
}

/// `?wait_for_change=true` is long polling for a change; the values the
/// broker serves do not change while it runs, so it is refused at once
/// rather than held open.
pub(super) fn refuse_wait_for_change(query: &Query) -> Result<(), Refusal> {
    if query.wait_for_change() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "wait_for_change is not supported by token-broker's metadata endpoint: the values \
             it serves do not change while it runs; ask without wait_for_change",
        ));
    }
    Ok(())
}

/// The project, instance and universe values: configured, passed through
/// from the metadata server (fetched once per source and kept), or derived.
pub(super) struct InstanceValues {
    configured: HashMap<InstanceValue, String>,
    fetched: tokio::sync::Mutex<Fetched>,
}

#[derive(Default)]
struct Fetched {
    /// The source the values came from: a reload that changes it empties
    /// them.
    fingerprint: String,
    /// `None`: the metadata server has no such value (404).
    values: HashMap<InstanceValue, Option<String>>,
    /// The last failed fetch: when, and its answer.
    failed: HashMap<InstanceValue, (Instant, StatusCode, String)>,
}

impl InstanceValues {
    pub(super) fn new(settings: &MetadataEndpointSettings) -> Self {
        let mut configured = HashMap::new();
        if let Some(project) = &settings.project_id {
            configured.insert(InstanceValue::ProjectId, project.clone());
        }
        if let Some(number) = settings.numeric_project_id {
            configured.insert(InstanceValue::NumericProjectId, number.to_string());
            if let Some(zone) = &settings.zone {
                configured.insert(
                    InstanceValue::Zone,
                    format!("projects/{number}/zones/{zone}"),
                );
            }
        }
        if let Some(id) = settings.instance_id {
            configured.insert(InstanceValue::InstanceId, id.to_string());
        }
        if let Some(domain) = &settings.universe_domain {
            configured.insert(InstanceValue::UniverseDomain, domain.clone());
        }
        Self {
            configured,
            fetched: tokio::sync::Mutex::new(Fetched::default()),
        }
    }

    /// The value, `None` when nothing knows it.
    async fn get(
        &self,
        state: &EndpointState,
        value: InstanceValue,
    ) -> Result<Option<String>, Refusal> {
        if let Some(configured) = self.configured.get(&value) {
            return Ok(Some(configured.clone()));
        }
        let Some(source) = state.cache.source(&state.identity) else {
            return Err(super::metadata_endpoint::unknown_identity(&state.identity));
        };
        let facts = source.instance();
        let mut known = None;
        if let Some(metadata) = &facts.metadata {
            // One fetch at a time; the others find its result.
            let mut fetched = self.fetched.lock().await;
            let fingerprint = source.fingerprint();
            if fetched.fingerprint != fingerprint {
                *fetched = Fetched {
                    fingerprint,
                    ..Fetched::default()
                };
            }
            if let Some(held) = fetched.values.get(&value) {
                known = held.clone();
            } else {
                if let Some((at, status, message)) = fetched.failed.get(&value) {
                    if at.elapsed() < FAILURE_HOLD {
                        return Err(Refusal::new(*status, message.clone()));
                    }
                }
                match metadata.fetch(value).await {
                    Ok(answer) => {
                        fetched.values.insert(value, answer.clone());
                        fetched.failed.remove(&value);
                        known = answer;
                    }
                    Err(err) => {
                        let refusal = upstream_failure(
                            &err,
                            &format!("cannot read {} from the metadata server: ", value.path()),
                        );
                        fetched.failed.insert(
                            value,
                            (Instant::now(), refusal.status, refusal.message.clone()),
                        );
                        return Err(refusal);
                    }
                }
            }
        }
        Ok(known.or_else(|| match value {
            InstanceValue::ProjectId => facts.project_id.clone(),
            InstanceValue::UniverseDomain => Some(DEFAULT_UNIVERSE.to_owned()),
            _ => None,
        }))
    }
}

/// Why a value is unknown, for the log line of its 404.
fn unknown_value_reason(value: InstanceValue) -> String {
    let key = match value {
        InstanceValue::ProjectId => "project_id",
        InstanceValue::NumericProjectId => "numeric_project_id",
        InstanceValue::Zone => "zone (with numeric_project_id)",
        InstanceValue::InstanceId => "instance_id",
        InstanceValue::UniverseDomain => "universe_domain",
    };
    format!(
        "{} is not known: the served identity is not on the metadata server (or it has no \
         such value) and metadata_endpoint.{key} is not set",
        value.path()
    )
}

/// The path's name, its JSON key, and the value, for a directory.
fn value_entry(value: InstanceValue) -> (&'static str, &'static str) {
    match value {
        InstanceValue::ProjectId => ("project-id", "projectId"),
        InstanceValue::NumericProjectId => ("numeric-project-id", "numericProjectId"),
        InstanceValue::Zone => ("zone", "zone"),
        InstanceValue::InstanceId => ("id", "id"),
        InstanceValue::UniverseDomain => ("universe-domain", "universeDomain"),
    }
}

fn children(tree: Tree) -> &'static [InstanceValue] {
    match tree {
        Tree::Instance => &[InstanceValue::InstanceId, InstanceValue::Zone],
        Tree::Project => &[InstanceValue::NumericProjectId, InstanceValue::ProjectId],
        Tree::Universe => &[InstanceValue::UniverseDomain],
        Tree::V1 | Tree::Value(_) => &[],
    }
}

fn listing(tree: Tree) -> &'static [&'static str] {
    match tree {
        Tree::V1 => &["instance/", "project/", "universe/"],
        Tree::Instance => &["id", "service-accounts/", "zone"],
        Tree::Project => &["numeric-project-id", "project-id"],
        Tree::Universe => &["universe-domain"],
        Tree::Value(_) => &[],
    }
}

/// Answers a [`Tree`] path.
pub(super) async fn tree(
    state: &EndpointState,
    peer: &PeerCredentials,
    tree: Tree,
    path: &str,
    query: &Query,
) -> Result<Response, Refusal> {
    let alt = alt(query)?;
    match tree {
        Tree::Value(value) => match state.instance_values.get(state, value).await? {
            Some(text) => Ok(render_value(
                &Node::Value {
                    text,
                    numeric: value.is_numeric(),
                },
                alt,
            )),
            None => Err(not_found(path, unknown_value_reason(value))),
        },
        dir if query.recursive() => Ok(render_recursive(&tree_node(state, peer, dir).await?, alt)),
        dir => Ok(render_listing(listing(dir), alt)),
    }
}

/// Everything under a directory; unknown values are left out.
async fn tree_node(
    state: &EndpointState,
    peer: &PeerCredentials,
    tree: Tree,
) -> Result<Node, Refusal> {
    let mut entries = Vec::new();
    match tree {
        Tree::V1 => {
            for (name, sub) in [
                ("instance", Tree::Instance),
                ("project", Tree::Project),
                ("universe", Tree::Universe),
            ] {
                let node = Box::pin(tree_node(state, peer, sub)).await?;
                entries.push((name.to_owned(), name.to_owned(), node));
            }
        }
        Tree::Instance | Tree::Project | Tree::Universe => {
            for &value in children(tree) {
                if let Some(text) = state.instance_values.get(state, value).await? {
                    let (name, key) = value_entry(value);
                    let node = Node::Value {
                        text,
                        numeric: value.is_numeric(),
                    };
                    entries.push((name.to_owned(), key.to_owned(), node));
                }
            }
            if tree == Tree::Instance {
                entries.push((
                    "service-accounts".to_owned(),
                    "serviceAccounts".to_owned(),
                    accounts_node(state, peer).await?,
                ));
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        Tree::Value(_) => {}
    }
    Ok(Node::Dir(entries))
}

/// The scopes an identity's access tokens have when none are asked for.
fn default_scopes() -> Vec<String> {
    vec![CLOUD_PLATFORM_SCOPE.to_owned()]
}

/// One account's directory, as `recursive=true` shows it.
fn account_node(email: &str) -> Node {
    Node::Dir(vec![
        (
            "aliases".into(),
            "aliases".into(),
            Node::List(vec!["default".into()]),
        ),
        ("email".into(), "email".into(), Node::text(email)),
        (
            "scopes".into(),
            "scopes".into(),
            Node::List(default_scopes()),
        ),
    ])
}

async fn accounts_node(state: &EndpointState, peer: &PeerCredentials) -> Result<Node, Refusal> {
    let email = state.account_email(peer).await?;
    Ok(Node::Dir(vec![
        ("default".into(), "default".into(), account_node(&email)),
        (email.clone(), email.clone(), account_node(&email)),
    ]))
}

/// `.../service-accounts/`: the served account, as `default` and by email.
pub(super) async fn service_accounts(
    state: &EndpointState,
    peer: &PeerCredentials,
    query: &Query,
) -> Result<Response, Refusal> {
    let alt = alt(query)?;
    if query.recursive() {
        return Ok(render_recursive(&accounts_node(state, peer).await?, alt));
    }
    let email = state.account_email(peer).await?;
    let email_dir = format!("{email}/");
    Ok(render_listing(&["default/", &email_dir], alt))
}

/// An account's directory, `email`, `scopes` or `aliases`.
pub(super) async fn account_leaf(
    state: &EndpointState,
    peer: &PeerCredentials,
    leaf: Leaf,
    query: &Query,
) -> Result<Response, Refusal> {
    let alt = alt(query)?;
    match leaf {
        Leaf::Directory if query.recursive() => {
            let email = state.account_email(peer).await?;
            Ok(render_recursive(&account_node(&email), alt))
        }
        Leaf::Directory => Ok(render_listing(
            &["aliases", "email", "identity", "scopes", "token"],
            alt,
        )),
        Leaf::Email => {
            let email = state.account_email(peer).await?;
            Ok(render_value(&Node::text(email), alt))
        }
        Leaf::Scopes => Ok(render_value(&Node::List(default_scopes()), alt)),
        Leaf::Aliases => Ok(render_value(&Node::List(vec!["default".into()]), alt)),
        Leaf::Identity | Leaf::Token | Leaf::Unknown => {
            unreachable!("identity, token and unknown leaves are routed elsewhere")
        }
    }
}

/// `?scopes=a,b` as the space-separated set the cache keys on; none asked:
/// the identity's default scopes (cloud-platform), as Google's server.
fn requested_scopes(scopes: Option<&str>) -> Result<String, Refusal> {
    let asked: Vec<&str> = scopes
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = asked.iter().find(|s| s.chars().any(char::is_whitespace)) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "scope {} holds whitespace; scopes are separated by commas",
                LogText::new(bad)
            ),
        ));
    }
    if asked.is_empty() {
        return Ok(CLOUD_PLATFORM_SCOPE.to_owned());
    }
    Ok(asked.join(" "))
}

/// `.../token[?scopes=a,b]`: an access token from the same cache and under
/// the same policy as gRPC's `GetAccessToken` (a `[[policy]]` rule must
/// grant every scope), answered as Google's JSON with `expires_in` counted
/// down from the cached token's expiry.
pub(super) async fn access_token(
    state: &EndpointState,
    peer: &PeerCredentials,
    query: &Query,
    outcome: &mut Outcome,
) -> Result<Response, Refusal> {
    let scopes = requested_scopes(query.scopes.as_deref())?;
    outcome.scopes = Some(scopes.clone());
    let key = CacheKey::access(&state.identity, AccessOf::Identity, &scopes)
        .map_err(|e| state.refused(CacheError::InvalidScopes(e).into()))?;
    let key = workload_account::admit(
        &state.cache,
        &state.live,
        state.pods.as_deref(),
        peer,
        key,
        Duration::ZERO,
        Record {
            decision: &mut outcome.decision,
            minted_as: &mut outcome.minted_as,
        },
    )
    .await
    .map_err(|refused| state.refused(refused))?;
    let lookup = tokio::time::timeout(
        super::metadata_endpoint::MAX_WAIT,
        state.cache.get_access(&key, Duration::ZERO),
    )
    .await
    .map_err(|_| timed_out(&state.identity))?
    .map_err(|e| state.cache_failure(e))?;
    outcome.cache = Some(lookup.outcome);
    let expires_in = lookup.token.remaining(state.cache.now()).as_secs();
    let body = serde_json::json!({
        "access_token": lookup.token.expose(),
        "expires_in": expires_in,
        "token_type": "Bearer",
    });
    Ok(respond(StatusCode::OK, JSON, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_paths_parse() {
        assert_eq!(tree_route("/computeMetadata/v1/"), Some(Tree::V1));
        assert_eq!(tree_route("/computeMetadata/v1"), Some(Tree::V1));
        assert_eq!(
            tree_route("/computeMetadata/v1/project"),
            Some(Tree::Project)
        );
        assert_eq!(
            tree_route("/computeMetadata/v1/instance/"),
            Some(Tree::Instance)
        );
        assert_eq!(
            tree_route("/computeMetadata/v1/project/project-id"),
            Some(Tree::Value(InstanceValue::ProjectId))
        );
        assert_eq!(
            tree_route("/computeMetadata/v1/universe/universe-domain"),
            Some(Tree::Value(InstanceValue::UniverseDomain))
        );
        assert_eq!(tree_route("/computeMetadata/v1/project/attributes/x"), None);
        assert_eq!(tree_route("/computeMetadata/v1/instance/zone/"), None);
        assert_eq!(tree_route("/computeMetadata/v2/"), None);
    }

    #[test]
    fn scopes_are_comma_separated_and_default_to_cloud_platform() {
        assert_eq!(requested_scopes(None).unwrap(), CLOUD_PLATFORM_SCOPE);
        assert_eq!(requested_scopes(Some("")).unwrap(), CLOUD_PLATFORM_SCOPE);
        assert_eq!(requested_scopes(Some("a,,b")).unwrap(), "a b");
        let bad = requested_scopes(Some("a b")).unwrap_err();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn nodes_render_as_json_and_as_path_value_lines() {
        let node = Node::Dir(vec![
            (
                "numeric-project-id".into(),
                "numericProjectId".into(),
                Node::Value {
                    text: "4520031799277581759".into(),
                    numeric: true,
                },
            ),
            (
                "aliases".into(),
                "aliases".into(),
                Node::List(vec!["default".into()]),
            ),
        ]);
        assert_eq!(
            node.json().to_string(),
            r#"{"aliases":["default"],"numericProjectId":4520031799277581759}"#
        );
        let mut text = String::new();
        node.flatten("", &mut text);
        assert_eq!(
            text,
            "numeric-project-id 4520031799277581759\naliases/0 default\n"
        );
    }

    #[test]
    fn the_404_page_escapes_the_path() {
        let refusal = not_found("/x<script>\"", "why");
        let (_, page) = refusal.page.unwrap();
        assert!(
            page.contains("<code>/x&lt;script&gt;&quot;</code>"),
            "{page}"
        );
        assert!(page.contains("Error 404 (Not Found)!!1"));
        assert_eq!(refusal.message, "why");
    }
}
