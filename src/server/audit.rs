//! The gRPC door's audit line: one per request, whatever its end, and one
//! per later event of an open `WatchIdToken` stream. Foreign text in it
//! (identity, audience, executable, error) goes through [`LogText`].

use tokio::time::Instant;
use tonic::Status;

use super::peer::PeerCredentials;
use crate::{
    cache::CacheOutcome,
    domain::{LogText, DEFAULT_IDENTITY},
    policy::Decision,
    proto,
};

/// What one request came to, for its audit line.
///
/// The line is written by [`Audit::finish`], or, when the client goes away
/// first (tonic drops the handler's future mid-fetch), by `Drop` with the
/// result `CANCELLED`: every request leaves exactly one line.
pub(super) struct Audit {
    pub(super) method: &'static str,
    /// `None` for a request; for a watch stream's later lines, what
    /// happened (`refresh`, `revoked`, `ended`, `closed`).
    pub(super) event: Option<&'static str>,
    pub(super) peer: PeerCredentials,
    /// As requested (empty means the default identity): foreign text,
    /// logged through [`LogText`].
    pub(super) identity: String,
    pub(super) audience: String,
    /// The scope set of an access-token request (sorted, space-separated).
    pub(super) scopes: Option<String>,
    /// The account a per-workload identity minted as for this caller.
    pub(super) minted_as: Option<String>,
    pub(super) decision: Option<Decision>,
    pub(super) outcome: Option<CacheOutcome>,
    pub(super) started: Instant,
    /// Whether the identity is configured: only then is it a metric label,
    /// so clients cannot grow the label set.
    pub(super) known: bool,
    pub(super) written: bool,
}

impl Audit {
    /// A token request by `peer`; takes the request's identity and
    /// audience rather than copying them.
    pub(super) fn start(
        method: &'static str,
        peer: PeerCredentials,
        req: &mut proto::GetIdTokenRequest,
    ) -> Self {
        let mut identity = std::mem::take(&mut req.identity);
        if identity.is_empty() {
            identity.push_str(DEFAULT_IDENTITY);
        }
        Audit {
            method,
            event: None,
            peer,
            identity,
            audience: std::mem::take(&mut req.audience),
            scopes: None,
            minted_as: None,
            decision: None,
            outcome: None,
            started: Instant::now(),
            known: false,
            written: false,
        }
    }

    /// The next line of an open watch stream, for the same caller and key.
    pub(super) fn stream_event(&self, event: &'static str) -> Audit {
        Audit {
            method: self.method,
            event: Some(event),
            peer: self.peer.clone(),
            identity: self.identity.clone(),
            audience: self.audience.clone(),
            scopes: self.scopes.clone(),
            minted_as: self.minted_as.clone(),
            decision: None,
            outcome: None,
            started: Instant::now(),
            known: self.known,
            written: false,
        }
    }

    /// An access-token request: `scopes` as the client sent them (joined
    /// by spaces; foreign text, logged through [`LogText`]).
    pub(super) fn start_access(
        method: &'static str,
        peer: &PeerCredentials,
        identity: &str,
        scopes: String,
    ) -> Self {
        Audit {
            method,
            event: None,
            peer: peer.clone(),
            identity: identity_of(identity).to_owned(),
            audience: String::new(),
            scopes: Some(scopes),
            minted_as: None,
            decision: None,
            outcome: None,
            started: Instant::now(),
            known: false,
            written: false,
        }
    }

    pub(super) fn finish_access(&mut self, result: Result<&proto::AccessToken, &Status>) {
        self.finish_with(result.map(|token| token.expire_time.as_ref()));
    }

    pub(super) fn finish(&mut self, result: Result<&proto::IdToken, &Status>) {
        self.finish_with(result.map(|token| token.expire_time.as_ref()));
    }

    /// The line for a request that ended with a token expiring at
    /// `expire_time`, or with `status`.
    fn finish_with(&mut self, result: Result<Option<&prost_types::Timestamp>, &Status>) {
        match result {
            Ok(expire_time) => self.write(tonic::Code::Ok, expire_time.map(|t| t.seconds), None),
            Err(status) => self.write(status.code(), None, Some(status.message())),
        }
    }

    /// One structured line: who, what, the decision and its rule, the cache
    /// outcome, latency and result. Never token text; every field a client
    /// or upstream wrote is capped, and quoted and escaped by the formatter.
    pub(super) fn write(
        &mut self,
        code: tonic::Code,
        expire_time: Option<i64>,
        error: Option<&str>,
    ) {
        if self.written {
            return;
        }
        self.written = true;
        let result = crate::client::code_name(code);
        let metric_identity = if self.known {
            crate::metrics::identity_label(&self.identity)
        } else {
            "unknown"
        };
        let metrics = crate::metrics::get();
        if self.event.is_none() {
            crate::metrics::count_request(crate::metrics::RequestLabels {
                method: self.method,
                identity: metric_identity,
                result,
                cache: self.outcome.map_or("none", CacheOutcome::as_str),
            });
        }
        if self.decision == Some(Decision::Denied) {
            metrics
                .policy_denials
                .get_or_create(&crate::metrics::IdentityLabels {
                    identity: metric_identity,
                })
                .inc();
        }
        let peer = &self.peer;
        let identity = LogText::capped(&self.identity);
        let audience = LogText::capped(&self.audience);
        let scopes = self.scopes.as_deref().map(LogText::capped);
        let error = error.map(LogText::capped);
        let decision = self
            .decision
            .map(|d| if d.allowed() { "allowed" } else { "denied" });
        let rule = self.decision.map(Decision::rule);
        let cache = self.outcome.map(CacheOutcome::as_str);
        let latency_us = self.started.elapsed().as_micros() as u64;
        // Served lines have a target of their own: the only info lines a
        // full log queue may drop (logging::pipe).
        macro_rules! line {
            ($($target:tt)*) => { tracing::info!(
            $($target)*
            peer_uid = peer.uid,
            peer_gid = peer.gid,
            peer_pid = peer.pid,
            peer_exe = peer.exe_text(),
            selectors = peer.selectors_text(),
            identity = &*identity,
            audience = &*audience,
            scopes = scopes.as_deref(),
            minted_as = self.minted_as.as_deref(),
            event = self.event,
            decision,
            rule,
            cache,
            latency_us,
            expire_time,
            result,
            error = error.as_deref(),
            "{}",
            self.method
        ) };
        }
        if code == tonic::Code::Ok {
            line!(target: crate::logging::SERVED_TARGET,);
        } else {
            line!();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // Only a request whose client went away is dropped unwritten.
        self.write(
            tonic::Code::Cancelled,
            None,
            Some("the client went away before the answer"),
        );
    }
}

/// The identity a request names: empty means the default one.
fn identity_of(requested: &str) -> &str {
    if requested.is_empty() {
        DEFAULT_IDENTITY
    } else {
        requested
    }
}
