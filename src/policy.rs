//! Who may ask for which identity and audience: the second gate after the
//! socket's permissions (DESIGN.md, security model).
//!
//! Rules match a caller by selectors: the uid and primary gid the kernel
//! recorded when it connected (SO_PEERCRED, captured at `connect()` and
//! unchangeable afterwards), and the workload's attested selectors
//! ([`crate::attest`]): its supplementary groups, executable and systemd
//! unit, read from `/proc` once per connection and confirmed to belong to
//! the connecting process, and on a Kubernetes node its pod's namespace,
//! service account and labels, as the kubelet lists the pod its cgroup
//! names. Within a rule every selector given must match;
//! rules are alternatives. A caller whose workload could not be attested
//! matches only on its uid and primary gid. A pod that reaches the
//! metadata endpoint from its own network namespace is known by its source
//! address alone: it has no uid, and only `k8s_*` selectors can match it.
//! This module decides on the [`Caller`] value alone and never reads
//! `/proc` itself.
//!
//! With no rule configured, every peer that can open the socket is allowed
//! (startup warns). With rules, a request is denied unless one allows it.

use crate::{
    attest::{cgroup::is_unit_name, Workload},
    config::RuleSettings,
    domain::{
        principal::{lookup_group, lookup_user},
        Principal, Problem, MAX_AUDIENCE_LEN,
    },
    kubernetes::{names, Pod},
};

/// The caller: what the kernel recorded at connect time, and its attested
/// workload when that was confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    /// `None` for a caller in another network namespace, known only by its
    /// source IP (a pod reaching the metadata endpoint on a node address):
    /// it has no uid on this host, so rules with `uids`, `gids`, `exe` or
    /// `systemd_units` never match it, and only the workload's Kubernetes
    /// selectors can.
    pub uid: Option<u32>,
    /// `None` when no group is known (a TCP peer whose uid has no entry in
    /// the user database): only `uids` rules can match it.
    pub gid: Option<u32>,
    /// `None` when the workload was not attested: rules with `exe`,
    /// `systemd_units` or `k8s_*` selectors do not match, and `gids` sees
    /// the primary gid only. (`k8s_*` also need the workload's `k8s_pod`.)
    pub workload: Option<&'a Workload>,
}

impl Caller<'_> {
    fn holds_gid(&self, wanted: &[u32]) -> bool {
        self.gid.is_some_and(|gid| wanted.contains(&gid))
            || self
                .workload
                .is_some_and(|w| w.gids.iter().any(|gid| wanted.contains(gid)))
    }
}

/// What the policy decided, and by which rule (for the audit line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No policy configured: open to anyone who can open the socket.
    AllowedOpen,
    /// Allowed by the rule at this index of `[[policy]]`.
    AllowedBy(usize),
    Denied,
}

impl Decision {
    pub fn allowed(self) -> bool {
        !matches!(self, Decision::Denied)
    }

    /// `"open"`, `"policy[N]"` or `"none"`, for logs.
    pub fn rule(self) -> String {
        match self {
            Decision::AllowedOpen => "open".into(),
            Decision::AllowedBy(i) => format!("policy[{i}]"),
            Decision::Denied => "none".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    uids: Vec<u32>,
    gids: Vec<u32>,
    exe: Vec<String>,
    systemd_units: Vec<String>,
    k8s_namespaces: Vec<String>,
    /// (namespace, name)
    k8s_service_accounts: Vec<(String, String)>,
    /// (key, value); all must be on the pod.
    k8s_pod_labels: Vec<(String, String)>,
    identities: Vec<String>,
    audiences: Vec<AudiencePattern>,
    scopes: Vec<ScopePattern>,
}

/// The compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Compiles `[[policy]]`, resolving user and group names now; every
    /// problem is reported with its key.
    pub fn compile(rules: &[RuleSettings]) -> Result<Policy, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let key = |field: &str| format!("policy[{i}].{field}");
            let uids = resolve(&rule.uids, &key("uids"), &mut problems, lookup_user);
            let gids = resolve(&rule.gids, &key("gids"), &mut problems, lookup_group);
            if rule.uids.is_empty()
                && rule.gids.is_empty()
                && rule.exe.is_empty()
                && rule.systemd_units.is_empty()
                && rule.k8s_namespaces.is_empty()
                && rule.k8s_service_accounts.is_empty()
                && rule.k8s_pod_labels.is_empty()
            {
                problems.push(Problem::new(
                    key("uids"),
                    "a rule must name at least one selector: uids, gids, exe, systemd_units, \
                     k8s_namespaces, k8s_service_accounts or k8s_pod_labels",
                ));
            }
            let (k8s_namespaces, k8s_service_accounts, k8s_pod_labels) =
                compile_k8s(rule, i, &mut problems);
            for (j, exe) in rule.exe.iter().enumerate() {
                if !exe.starts_with('/') || exe.contains('\0') || exe.len() > 4096 {
                    problems.push(Problem::new(
                        format!("policy[{i}].exe[{j}]"),
                        format!(
                            "{exe:?} is not an absolute path (exe is matched against \
                             /proc/PID/exe, e.g. \"/usr/bin/python3.12\")"
                        ),
                    ));
                }
            }
            for (j, unit) in rule.systemd_units.iter().enumerate() {
                if !is_unit_name(unit) {
                    problems.push(Problem::new(
                        format!("policy[{i}].systemd_units[{j}]"),
                        format!(
                            "{unit:?} is not a systemd service or scope name \
                             (e.g. \"nginx.service\", \"getty@tty1.service\")"
                        ),
                    ));
                }
            }
            if rule.identities.is_empty() {
                problems.push(Problem::new(
                    key("identities"),
                    "must list at least one identity (or \"*\")",
                ));
            }
            if rule.audiences.is_empty() && rule.scopes.is_empty() {
                problems.push(Problem::new(
                    key("audiences"),
                    "must list at least one audience (or \"*\"), or the rule must grant `scopes`",
                ));
            }
            let mut scopes = Vec::new();
            for (j, text) in rule.scopes.iter().enumerate() {
                match ScopePattern::parse(text) {
                    Ok(p) => scopes.push(p),
                    Err(message) => {
                        problems.push(Problem::new(format!("policy[{i}].scopes[{j}]"), message))
                    }
                }
            }
            let mut audiences = Vec::new();
            for (j, text) in rule.audiences.iter().enumerate() {
                match AudiencePattern::parse(text) {
                    Ok(p) => audiences.push(p),
                    Err(message) => {
                        problems.push(Problem::new(format!("policy[{i}].audiences[{j}]"), message))
                    }
                }
            }
            compiled.push(Rule {
                uids,
                gids,
                exe: rule.exe.clone(),
                systemd_units: rule.systemd_units.clone(),
                k8s_namespaces,
                k8s_service_accounts,
                k8s_pod_labels,
                identities: rule.identities.clone(),
                audiences,
                scopes,
            });
        }
        if problems.is_empty() {
            Ok(Policy { rules: compiled })
        } else {
            Err(problems)
        }
    }

    /// Whether no rule is configured (anyone who can open the socket may ask).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// May `caller` have some token of `identity` (any audience or scope)?
    /// Asked before work done for the identity's sake alone, such as
    /// reading a per-workload identity's account for its `email`.
    pub fn serves_identity(&self, caller: Option<Caller<'_>>, identity: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        caller.is_some_and(|caller| self.rules.iter().any(|rule| rule.serves(&caller, identity)))
    }

    /// May `caller` have a token for (`identity`, `audience`)?
    pub fn decide(&self, caller: Option<Caller<'_>>, identity: &str, audience: &str) -> Decision {
        if self.rules.is_empty() {
            return Decision::AllowedOpen;
        }
        // Peer credentials are always present on a Unix socket; without
        // them (never expected) a configured policy denies.
        let Some(caller) = caller else {
            return Decision::Denied;
        };
        self.rules
            .iter()
            .position(|rule| {
                rule.serves(&caller, identity) && rule.audiences.iter().any(|p| p.matches(audience))
            })
            .map_or(Decision::Denied, Decision::AllowedBy)
    }

    /// May `caller` have an access token of `identity` for every one of
    /// `scopes`? Only a rule that grants them all does: with no rules at
    /// all (an open policy for ID tokens) access tokens stay off.
    pub fn decide_access<'a>(
        &self,
        caller: Option<Caller>,
        identity: &str,
        scopes: impl Iterator<Item = &'a str> + Clone,
    ) -> Decision {
        let Some(caller) = caller else {
            return Decision::Denied;
        };
        self.rules
            .iter()
            .position(|rule| {
                rule.serves(&caller, identity)
                    && !rule.scopes.is_empty()
                    && scopes
                        .clone()
                        .all(|scope| rule.scopes.iter().any(|p| p.matches(scope)))
            })
            .map_or(Decision::Denied, Decision::AllowedBy)
    }
}

/// One `scopes` entry of a rule: an exact scope, a prefix ending in `*`
/// (`https://www.googleapis.com/auth/devstorage.*`), or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopePattern {
    Exact(String),
    Prefix(String),
}

impl ScopePattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{:?} is not a scope: printable ASCII without spaces",
                crate::domain::LogText::new(text).as_str()
            ));
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => {
                Err(format!("{text:?}: `*` may only end a scope pattern"))
            }
            Some(prefix) => Ok(ScopePattern::Prefix(prefix.to_owned())),
            None => Ok(ScopePattern::Exact(text.to_owned())),
        }
    }

    pub fn matches(&self, scope: &str) -> bool {
        match self {
            ScopePattern::Exact(s) => s == scope,
            ScopePattern::Prefix(p) => scope.starts_with(p.as_str()),
        }
    }
}

impl Rule {
    /// Every selector the rule gives matches the caller.
    /// This rule applies to `caller` and grants it `identity`.
    fn serves(&self, caller: &Caller<'_>, identity: &str) -> bool {
        self.selects(caller) && self.identities.iter().any(|i| i == "*" || i == identity)
    }

    fn selects(&self, caller: &Caller<'_>) -> bool {
        let workload = caller.workload;
        (self.uids.is_empty() || caller.uid.is_some_and(|uid| self.uids.contains(&uid)))
            && (self.gids.is_empty() || caller.holds_gid(&self.gids))
            && (self.exe.is_empty()
                || workload
                    .and_then(|w| w.exe.as_ref())
                    .is_some_and(|exe| self.exe.contains(exe)))
            && (self.systemd_units.is_empty()
                || workload
                    .and_then(|w| w.systemd_unit.as_ref())
                    .is_some_and(|unit| self.systemd_units.contains(unit)))
            && self.selects_pod(workload.and_then(|w| w.k8s_pod.as_deref()))
    }

    /// The `k8s_*` selectors: none given, or an attested pod matching each.
    fn selects_pod(&self, pod: Option<&Pod>) -> bool {
        if self.k8s_namespaces.is_empty()
            && self.k8s_service_accounts.is_empty()
            && self.k8s_pod_labels.is_empty()
        {
            return true;
        }
        let Some(pod) = pod else {
            return false;
        };
        (self.k8s_namespaces.is_empty() || self.k8s_namespaces.contains(&pod.namespace))
            && (self.k8s_service_accounts.is_empty()
                || self
                    .k8s_service_accounts
                    .iter()
                    .any(|(ns, sa)| *ns == pod.namespace && *sa == pod.service_account))
            && self
                .k8s_pod_labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }
}

/// A rule's `k8s_*` selectors, checked against Kubernetes' name grammar.
#[allow(clippy::type_complexity)]
fn compile_k8s(
    rule: &RuleSettings,
    i: usize,
    problems: &mut Vec<Problem>,
) -> (Vec<String>, Vec<(String, String)>, Vec<(String, String)>) {
    let mut namespaces = Vec::new();
    for (j, namespace) in rule.k8s_namespaces.iter().enumerate() {
        if names::is_dns_label(namespace) {
            namespaces.push(namespace.clone());
        } else {
            problems.push(Problem::new(
                format!("policy[{i}].k8s_namespaces[{j}]"),
                format!(
                    "{:?} is not a namespace name (DNS-1123 label: a-z 0-9 -, at most 63)",
                    crate::domain::LogText::new(namespace).as_str()
                ),
            ));
        }
    }
    let mut accounts = Vec::new();
    for (j, text) in rule.k8s_service_accounts.iter().enumerate() {
        match names::parse_service_account_ref(text) {
            Ok((ns, name)) => accounts.push((ns.to_owned(), name.to_owned())),
            Err(message) => problems.push(Problem::new(
                format!("policy[{i}].k8s_service_accounts[{j}]"),
                message,
            )),
        }
    }
    let mut labels = Vec::new();
    for (j, text) in rule.k8s_pod_labels.iter().enumerate() {
        match names::parse_label_selector(text) {
            Ok((key, value)) => labels.push((key.to_owned(), value.to_owned())),
            Err(message) => problems.push(Problem::new(
                format!("policy[{i}].k8s_pod_labels[{j}]"),
                message,
            )),
        }
    }
    (namespaces, accounts, labels)
}

fn resolve(
    principals: &[Principal],
    key: &str,
    problems: &mut Vec<Problem>,
    lookup: impl Fn(&str) -> Option<u32>,
) -> Vec<u32> {
    principals
        .iter()
        .enumerate()
        .filter_map(|(j, p)| {
            let id = p.resolve(&lookup);
            if id.is_none() {
                problems.push(Problem::new(
                    format!("{key}[{j}]"),
                    format!("no such user or group {p} on this system"),
                ));
            }
            id
        })
        .collect()
}

/// An audience grant: an exact string, `*` for any audience, or a pattern
/// in which each `*` matches one or more of the characters a DNS label may
/// hold (`A-Z a-z 0-9 -`), so `https://*.a.run.app` grants every Cloud Run
/// service URL in that form and nothing that a URL parser could read as
/// another host (no `.`, `/`, `:`, `@`, `%`, `\`, ...).
///
/// A pattern is compiled once, at config load, to a `regex` automaton: its
/// matching time is linear in the audience's length whatever the pattern,
/// so no audience can make the policy check expensive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudiencePattern {
    Any,
    Exact(String),
    Wildcard(Wildcard),
}

/// A compiled pattern with at least one `*`.
#[derive(Debug, Clone)]
pub struct Wildcard {
    text: String,
    regex: regex::Regex,
}

impl PartialEq for Wildcard {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Wildcard {}

/// What one `*` matches: one DNS label's characters, at least one.
const LABEL: &str = "[A-Za-z0-9-]+";

impl AudiencePattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(AudiencePattern::Any);
        }
        if text.is_empty() {
            return Err("an audience pattern must not be empty".into());
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{text:?} contains whitespace or a control character"
            ));
        }
        if text.len() > MAX_AUDIENCE_LEN {
            return Err("longer than 2048 bytes".into());
        }
        if !text.contains('*') {
            return Ok(AudiencePattern::Exact(text.to_owned()));
        }
        if text.contains("**") {
            return Err(format!(
                "{text:?}: `**` is not supported; `*` matches within one DNS label"
            ));
        }
        let literals: Vec<String> = text.split('*').map(regex::escape).collect();
        let regex = regex::Regex::new(&format!(r"\A{}\z", literals.join(LABEL)))
            .map_err(|e| format!("{text:?} cannot be compiled: {e}"))?;
        Ok(AudiencePattern::Wildcard(Wildcard {
            text: text.to_owned(),
            regex,
        }))
    }

    pub fn matches(&self, audience: &str) -> bool {
        match self {
            AudiencePattern::Any => true,
            AudiencePattern::Exact(exact) => exact == audience,
            AudiencePattern::Wildcard(w) => w.regex.is_match(audience),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> AudiencePattern {
        AudiencePattern::parse(text).unwrap()
    }

    #[test]
    fn an_identity_is_served_when_some_rule_grants_it_to_the_caller() {
        let caller = |uid| {
            Some(Caller {
                uid: Some(uid),
                gid: None,
                workload: None,
            })
        };
        assert!(Policy::default().serves_identity(caller(7), "any"));
        let policy = Policy::compile(&[RuleSettings {
            uids: vec![Principal::Id(1000)],
            identities: vec!["pods".into()],
            audiences: vec!["https://a.example.com".into()],
            ..RuleSettings::default()
        }])
        .unwrap();
        assert!(policy.serves_identity(caller(1000), "pods"));
        assert!(!policy.serves_identity(caller(1000), "other"));
        assert!(!policy.serves_identity(caller(1001), "pods"));
        assert!(!policy.serves_identity(None, "pods"));
    }

    #[test]
    fn access_tokens_need_a_rule_granting_every_scope() {
        let caller = Some(Caller {
            uid: Some(1000),
            gid: None,
            workload: None,
        });
        let cp = "https://www.googleapis.com/auth/cloud-platform";
        let ro = "https://www.googleapis.com/auth/devstorage.read_only";
        // An open policy (no rules) grants ID tokens, never access tokens.
        let open = Policy::default();
        assert_eq!(open.decide(caller, "default", "a"), Decision::AllowedOpen);
        assert_eq!(
            open.decide_access(caller, "default", [cp].into_iter()),
            Decision::Denied
        );
        let policy = Policy::compile(&[
            RuleSettings {
                uids: vec![Principal::Id(1000)],
                identities: vec!["default".into()],
                audiences: vec!["*".into()],
                ..RuleSettings::default()
            },
            RuleSettings {
                uids: vec![Principal::Id(1000)],
                identities: vec!["default".into()],
                scopes: vec![
                    cp.into(),
                    "https://www.googleapis.com/auth/devstorage.*".into(),
                ],
                ..RuleSettings::default()
            },
        ])
        .unwrap();
        assert_eq!(
            policy.decide_access(caller, "default", [cp, ro].into_iter()),
            Decision::AllowedBy(1)
        );
        assert_eq!(
            policy.decide_access(
                caller,
                "default",
                [cp, "https://www.googleapis.com/auth/gmail.send"].into_iter()
            ),
            Decision::Denied,
            "every scope must be granted"
        );
        assert_eq!(
            policy.decide_access(caller, "other", [cp].into_iter()),
            Decision::Denied
        );
        assert_eq!(
            policy.decide_access(
                Some(Caller {
                    uid: Some(1001),
                    gid: None,
                    workload: None,
                }),
                "default",
                [cp].into_iter()
            ),
            Decision::Denied
        );
        // A scopes-only rule grants no ID token.
        assert_eq!(
            policy.decide(caller, "default", "x"),
            Decision::AllowedBy(0)
        );
        assert!(ScopePattern::parse("a*b*").is_err());
        assert!(ScopePattern::parse("a b").is_err());
    }

    #[test]
    fn wildcards_stay_within_one_label() {
        let p = pattern("https://*.a.run.app");
        assert!(p.matches("https://svc-abc-uc.a.run.app"));
        assert!(!p.matches("https://.a.run.app"));
        assert!(!p.matches("https://x.y.a.run.app"));
        assert!(!p.matches("https://evil.com/.a.run.app"));
        assert!(!p.matches("https://svc.a.run.app.evil.com"));
        assert!(!p.matches("https://svc.a.run.app/"));
        let p = pattern("https://api-*-uc.example.com/*");
        assert!(p.matches("https://api-7-uc.example.com/v1"));
        assert!(!p.matches("https://api-7-uc.example.com/v1/x"));
        assert!(pattern("*").matches("anything at all"));
        assert!(pattern("https://exact").matches("https://exact"));
        assert!(!pattern("https://exact").matches("https://exact2"));
        assert!(AudiencePattern::parse("https://**.x").is_err());
        assert!(AudiencePattern::parse("").is_err());
        // Regex syntax in a pattern is literal text.
        let p = pattern("https://*.a.run.app/(x|y)+");
        assert!(p.matches("https://s.a.run.app/(x|y)+"));
        assert!(!p.matches("https://s.a.run.app/xx"));
    }

    #[test]
    fn a_star_matches_only_dns_label_characters() {
        let p = pattern("https://*.a.run.app");
        assert!(p.matches("https://Svc-09-uc.a.run.app"));
        for other_origin in [
            r"https://payments%2Eexample%2Ecom\.a.run.app",
            "https://payments%2Eexample%2Ecom.a.run.app",
            r"https://evil.com\.a.run.app",
            "https://user@evil.a.run.app",
            "https://evil:443.a.run.app",
            "https://evil_1.a.run.app",
            "https://évil.a.run.app",
            "https://evil?.a.run.app",
            "https://evil#.a.run.app",
        ] {
            assert!(!p.matches(other_origin), "{other_origin}");
        }
    }

    #[test]
    fn matching_a_hostile_audience_is_linear() {
        // Every `-` is a place each of the three stars could end, so the
        // old backtracking matcher tried ~n^3/6 splits (18 s of CPU here).
        let p = pattern("https://*-*-*.b.run.app");
        let hostile = format!("https://{}.c.run.app", "-".repeat(2030));
        assert_eq!(hostile.len(), 2048);
        let started = std::time::Instant::now();
        assert!(!p.matches(&hostile));
        let took = started.elapsed();
        println!("pattern match on a 2,048-byte hostile audience: {took:?}");
        assert!(took < std::time::Duration::from_millis(50), "{took:?}");
        assert!(p.matches("https://a-b-c.b.run.app"));
        assert!(p.matches("https://a-b-c-d.b.run.app"));
        assert!(!p.matches("https://a-b.b.run.app"));
    }

    fn rules() -> Vec<RuleSettings> {
        vec![
            RuleSettings {
                uids: vec![Principal::Id(1000)],
                identities: vec!["default".into()],
                audiences: vec![
                    "https://*.a.run.app".into(),
                    "https://api.example.com".into(),
                ],
                ..RuleSettings::default()
            },
            RuleSettings {
                gids: vec![Principal::Name("2000".into())],
                identities: vec!["*".into()],
                audiences: vec!["https://shared.example.com".into()],
                ..RuleSettings::default()
            },
        ]
    }

    #[test]
    fn decisions() {
        let policy = Policy::compile(&rules()).unwrap();
        let alice = Some(Caller {
            uid: Some(1000),
            gid: Some(1000),
            workload: None,
        });
        let team = Some(Caller {
            uid: Some(1500),
            gid: Some(2000),
            workload: None,
        });
        assert_eq!(
            policy.decide(alice, "default", "https://svc.a.run.app"),
            Decision::AllowedBy(0)
        );
        assert_eq!(
            policy.decide(alice, "default", "https://other.example.com"),
            Decision::Denied
        );
        assert_eq!(
            policy.decide(alice, "deployer", "https://api.example.com"),
            Decision::Denied
        );
        assert_eq!(
            policy.decide(team, "deployer", "https://shared.example.com"),
            Decision::AllowedBy(1)
        );
        assert_eq!(
            policy.decide(team, "default", "https://svc.a.run.app"),
            Decision::Denied
        );
        assert_eq!(
            policy.decide(None, "default", "https://svc.a.run.app"),
            Decision::Denied
        );
        assert_eq!(
            Policy::default().decide(None, "x", "y"),
            Decision::AllowedOpen
        );
    }

    #[test]
    fn names_resolve_and_unknown_names_are_config_errors() {
        let mut r = rules();
        r[0].uids = vec![Principal::Name("root".into())];
        r[1].gids = vec![Principal::Name("no-such-group-xyz".into())];
        let problems = Policy::compile(&r).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "policy[1].gids[0]");
        r[1].gids = vec![Principal::Name("root".into())];
        let policy = Policy::compile(&r).unwrap();
        assert!(policy
            .decide(
                Some(Caller {
                    uid: Some(0),
                    gid: Some(5),
                    workload: None,
                }),
                "default",
                "https://a.a.run.app"
            )
            .allowed());
    }

    #[test]
    fn rules_must_name_someone_something() {
        let problems = Policy::compile(&[RuleSettings {
            ..RuleSettings::default()
        }])
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "policy[0].uids",
                "policy[0].identities",
                "policy[0].audiences"
            ]
        );
    }

    fn workload(gids: &[u32], exe: &str, unit: Option<&str>) -> Workload {
        Workload {
            pid: 42,
            gids: gids.to_vec(),
            exe: Some(exe.into()),
            systemd_unit: unit.map(str::to_owned),
            pod: None,
            k8s_pod: None,
            k8s_unattested: None,
        }
    }

    fn rule(uids: &[u32], gids: &[u32], exe: &[&str], units: &[&str]) -> RuleSettings {
        RuleSettings {
            uids: uids.iter().map(|u| Principal::Id(*u)).collect(),
            gids: gids.iter().map(|g| Principal::Id(*g)).collect(),
            exe: exe.iter().map(|e| e.to_string()).collect(),
            systemd_units: units.iter().map(|u| u.to_string()).collect(),
            identities: vec!["*".into()],
            audiences: vec!["*".into()],
            ..RuleSettings::default()
        }
    }

    #[test]
    fn every_selector_of_a_rule_must_match_and_rules_are_alternatives() {
        let policy = Policy::compile(&[
            rule(&[1000], &[], &[], &["web.service"]),
            rule(&[], &[27], &["/usr/bin/deploy"], &[]),
        ])
        .unwrap();
        let web = workload(&[1000], "/usr/bin/python3", Some("web.service"));
        let shell = workload(&[1000], "/usr/bin/python3", Some("session-3.scope"));
        let deploy = workload(&[1000, 27], "/usr/bin/deploy", None);
        let caller = |uid, w| {
            Some(Caller {
                uid: Some(uid),
                gid: Some(1000),
                workload: w,
            })
        };
        let decide = |c| policy.decide(c, "x", "y");
        assert_eq!(decide(caller(1000, Some(&web))), Decision::AllowedBy(0));
        // Same uid, another unit: the unit selector does not match.
        assert_eq!(decide(caller(1000, Some(&shell))), Decision::Denied);
        // The unit, but another uid.
        assert_eq!(decide(caller(1001, Some(&web))), Decision::Denied);
        // Unattested: only uid and primary gid are known.
        assert_eq!(decide(caller(1000, None)), Decision::Denied);
        // A supplementary group and the executable.
        assert_eq!(decide(caller(1000, Some(&deploy))), Decision::AllowedBy(1));
        let other_exe = workload(&[1000, 27], "/usr/bin/bash", None);
        assert_eq!(decide(caller(1000, Some(&other_exe))), Decision::Denied);
        let no_group = workload(&[1000], "/usr/bin/deploy", None);
        assert_eq!(decide(caller(1000, Some(&no_group))), Decision::Denied);
    }

    #[test]
    fn access_tokens_obey_the_same_workload_selectors() {
        let cp = "https://www.googleapis.com/auth/cloud-platform";
        let mut scoped = rule(&[1000], &[], &[], &["web.service"]);
        scoped.audiences = vec![];
        scoped.scopes = vec![cp.into()];
        let policy = Policy::compile(&[scoped]).unwrap();
        let web = workload(&[1000], "/usr/bin/python3", Some("web.service"));
        let shell = workload(&[1000], "/usr/bin/python3", Some("session-3.scope"));
        let caller = |w| {
            Some(Caller {
                uid: Some(1000),
                gid: Some(1000),
                workload: w,
            })
        };
        let decide = |c| policy.decide_access(c, "default", [cp].into_iter());
        assert_eq!(decide(caller(Some(&web))), Decision::AllowedBy(0));
        assert_eq!(decide(caller(Some(&shell))), Decision::Denied);
        assert_eq!(decide(caller(None)), Decision::Denied);
    }

    #[test]
    fn a_rule_with_uids_and_gids_needs_both() {
        let policy = Policy::compile(&[rule(&[1000], &[27], &[], &[])]).unwrap();
        let with = |gid| {
            policy.decide(
                Some(Caller {
                    uid: Some(1000),
                    gid: Some(gid),
                    workload: None,
                }),
                "x",
                "y",
            )
        };
        assert_eq!(with(27), Decision::AllowedBy(0));
        assert_eq!(with(1000), Decision::Denied);
    }

    #[test]
    fn workload_selectors_are_checked_with_their_keys() {
        let problems = Policy::compile(&[rule(
            &[],
            &[],
            &["python3", "/usr/bin/ok"],
            &["nginx", "web.service", "a/b.service", "x.socket"],
        )])
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "policy[0].exe[0]",
                "policy[0].systemd_units[0]",
                "policy[0].systemd_units[2]",
                "policy[0].systemd_units[3]"
            ]
        );
        assert!(problems[1].message.contains("\"nginx\" is not a systemd"));
        // A rule may name a unit alone.
        assert!(Policy::compile(&[rule(&[], &[], &[], &["web.service"])]).is_ok());
    }

    fn k8s_rule(namespaces: &[&str], accounts: &[&str], labels: &[&str]) -> RuleSettings {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        RuleSettings {
            k8s_namespaces: list(namespaces),
            k8s_service_accounts: list(accounts),
            k8s_pod_labels: list(labels),
            ..rule(&[], &[], &[], &[])
        }
    }

    fn pod_workload(namespace: &str, account: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            k8s_pod: Some(std::sync::Arc::new(Pod {
                namespace: namespace.into(),
                name: "api-7f9c8d6b5-x2x4q".into(),
                uid: "5f1c2a9e-8b7d-4e3f-a1b2-c3d4e5f60718".into(),
                service_account: account.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                pod_ips: vec![],
                host_network: false,
                containers: vec![],
                running: true,
            })),
            ..workload(&[0], "/app", None)
        }
    }

    #[test]
    fn k8s_selectors_match_the_attested_pod_only() {
        let policy = Policy::compile(&[
            k8s_rule(&[], &["payments/api-sa"], &[]),
            k8s_rule(&["batch"], &[], &["app=report", "tier=jobs"]),
        ])
        .unwrap();
        let decide = |w: Option<&Workload>| {
            policy.decide(
                Some(Caller {
                    uid: Some(0),
                    gid: Some(0),
                    workload: w,
                }),
                "default",
                "a",
            )
        };
        let api = pod_workload("payments", "api-sa", &[]);
        assert_eq!(decide(Some(&api)), Decision::AllowedBy(0));
        // Same uid, same namespace, another service account.
        let other = pod_workload("payments", "worker-sa", &[]);
        assert_eq!(decide(Some(&other)), Decision::Denied);
        // A service account of the same name in another namespace.
        let elsewhere = pod_workload("staging", "api-sa", &[]);
        assert_eq!(decide(Some(&elsewhere)), Decision::Denied);
        // Every listed label, and the namespace.
        let both = pod_workload("batch", "default", &[("app", "report"), ("tier", "jobs")]);
        assert_eq!(decide(Some(&both)), Decision::AllowedBy(1));
        let one = pod_workload("batch", "default", &[("app", "report")]);
        assert_eq!(decide(Some(&one)), Decision::Denied);
        let wrong_ns = pod_workload(
            "payments",
            "default",
            &[("app", "report"), ("tier", "jobs")],
        );
        assert_eq!(decide(Some(&wrong_ns)), Decision::Denied);
        // No attested pod (kubelet down, not a pod, unattested): no k8s rule.
        assert_eq!(
            decide(Some(&workload(&[0], "/app", None))),
            Decision::Denied
        );
        assert_eq!(decide(None), Decision::Denied);
    }

    /// A pod known only by its source address (the metadata endpoint on a
    /// node address) has no uid, group, executable or unit here: only
    /// `k8s_*` rules can match it, whatever else the rules name.
    #[test]
    fn a_caller_known_by_its_pod_address_matches_k8s_rules_only() {
        fn by_address(w: &Workload) -> Caller<'_> {
            Caller {
                uid: None,
                gid: None,
                workload: Some(w),
            }
        }
        let mut pod = pod_workload("payments", "api-sa", &[]);
        pod.gids.clear();
        pod.exe = None;
        let by_uid = Policy::compile(&[rule(&[0], &[0], &[], &[])]).unwrap();
        assert_eq!(
            by_uid.decide(Some(by_address(&pod)), "default", "a"),
            Decision::Denied
        );
        let by_exe = Policy::compile(&[rule(&[], &[], &["/app"], &[])]).unwrap();
        assert_eq!(
            by_exe.decide(Some(by_address(&pod)), "default", "a"),
            Decision::Denied
        );
        let by_pod =
            Policy::compile(&[rule(&[0], &[], &[], &[]), k8s_rule(&["payments"], &[], &[])])
                .unwrap();
        assert_eq!(
            by_pod.decide(Some(by_address(&pod)), "default", "a"),
            Decision::AllowedBy(1)
        );
        // A k8s rule that also names a uid needs both: never for this caller.
        let both = Policy::compile(&[RuleSettings {
            k8s_namespaces: vec!["payments".into()],
            ..rule(&[0], &[], &[], &[])
        }])
        .unwrap();
        assert_eq!(
            both.decide(Some(by_address(&pod)), "default", "a"),
            Decision::Denied
        );
    }

    #[test]
    fn k8s_selectors_are_checked_with_their_keys() {
        let problems = Policy::compile(&[k8s_rule(
            &["Payments", "ok"],
            &["payments", "a/b", "x/Bad_Name"],
            &["app", "app=ok", "-bad=1", "k=v v"],
        )])
        .unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "policy[0].k8s_namespaces[0]",
                "policy[0].k8s_service_accounts[0]",
                "policy[0].k8s_service_accounts[2]",
                "policy[0].k8s_pod_labels[0]",
                "policy[0].k8s_pod_labels[2]",
                "policy[0].k8s_pod_labels[3]",
            ]
        );
        assert!(problems[0].message.contains("DNS-1123"), "{}", problems[0]);
        // A rule may name pods alone.
        assert!(Policy::compile(&[k8s_rule(&["payments"], &[], &[])]).is_ok());
    }
}
