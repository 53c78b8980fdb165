//! An open `WatchIdToken` or `WatchAccessToken` stream, as one task: the
//! first token, then each refreshed one, with the caller's grant re-checked
//! against the policy in force before every delivery and at every reload
//! (issue 11, point 3). [`Kind`] is what differs between the two.

use std::sync::Arc;

use tokio::sync::watch;
use tonic::Status;

use super::{
    audit::Audit,
    grpc::{access_to_proto, check_access_grant, check_grant, to_proto},
    live::Live,
};
use crate::{
    cache::{CacheKey, TokenCache},
    proto,
    token::{AccessToken, IdToken},
};

/// The token kind a stream carries.
pub(super) trait Kind: Send + 'static {
    type Token: Clone + Send + Sync + 'static;
    type Proto: Send + 'static;
    fn to_proto(token: &Self::Token, key: &CacheKey) -> Self::Proto;
    fn finish(audit: &mut Audit, result: Result<&Self::Proto, &Status>);
    fn grant(
        live: &Live,
        cache: &TokenCache,
        audit: &mut Audit,
        key: &CacheKey,
    ) -> Result<(), Status>;
}

/// `WatchIdToken`.
pub(super) struct IdTokens;

impl Kind for IdTokens {
    type Token = IdToken;
    type Proto = proto::IdToken;

    fn to_proto(token: &IdToken, key: &CacheKey) -> proto::IdToken {
        to_proto(token, key.identity(), key.audience())
    }

    fn finish(audit: &mut Audit, result: Result<&proto::IdToken, &Status>) {
        audit.finish(result);
    }

    fn grant(
        live: &Live,
        cache: &TokenCache,
        audit: &mut Audit,
        _key: &CacheKey,
    ) -> Result<(), Status> {
        check_grant(live, cache, audit)
    }
}

/// `WatchAccessToken`.
pub(super) struct AccessTokens;

impl Kind for AccessTokens {
    type Token = AccessToken;
    type Proto = proto::AccessToken;

    fn to_proto(token: &AccessToken, key: &CacheKey) -> proto::AccessToken {
        access_to_proto(token, key)
    }

    fn finish(audit: &mut Audit, result: Result<&proto::AccessToken, &Status>) {
        audit.finish_access(result);
    }

    fn grant(
        live: &Live,
        cache: &TokenCache,
        audit: &mut Audit,
        key: &CacheKey,
    ) -> Result<(), Status> {
        check_access_grant(live, cache, audit, key)
    }
}

/// What woke a watch stream.
enum Wake {
    Closed,
    Stopping,
    Reloaded,
    Token,
    EntryGone,
}

/// One open `WatchIdToken` stream: sends the first token, then each
/// refreshed one, re-checking the grant against the policy in force before
/// every delivery and at every reload. A revoked grant (or an identity
/// removed by a reload) ends the stream with the status a new request would
/// get, and an audit line; so does the daemon stopping (UNAVAILABLE).
pub(super) struct WatchFeed<K: Kind> {
    /// The stream's opening request, the template of its later lines.
    pub(super) audit: Audit,
    pub(super) cache: TokenCache,
    pub(super) live: Arc<Live>,
    pub(super) key: CacheKey,
    pub(super) tokens: watch::Receiver<Option<K::Token>>,
    pub(super) reloads: watch::Receiver<u64>,
    pub(super) stopping: watch::Receiver<bool>,
    pub(super) sender: tokio::sync::mpsc::Sender<Result<K::Proto, Status>>,
    /// Held (with the receiver, which keeps the key from idle eviction)
    /// until the stream ends.
    pub(super) _slot: super::share::Place,
    pub(super) _kind: std::marker::PhantomData<K>,
}

impl<K: Kind> WatchFeed<K> {
    pub(super) async fn run(mut self, first: K::Proto) {
        // A reload may have come while the first token was being fetched.
        if let Err(status) = self.recheck() {
            return self.end("revoked", status).await;
        }
        if self.sender.send(Ok(first)).await.is_err() {
            return self.close();
        }
        loop {
            let wake = tokio::select! {
                biased;
                () = self.sender.closed() => Wake::Closed,
                _ = self.stopping.wait_for(|stopping| *stopping) => Wake::Stopping,
                changed = self.reloads.changed() => match changed {
                    Ok(()) => Wake::Reloaded,
                    // The daemon is going away; stopping ends the stream.
                    Err(_) => Wake::Stopping,
                },
                changed = self.tokens.changed() => match changed {
                    Ok(()) => Wake::Token,
                    Err(_) => Wake::EntryGone,
                },
            };
            match wake {
                Wake::Closed => return self.close(),
                Wake::Stopping => {
                    let status = Status::unavailable(
                        "token-broker is shutting down; reconnect to watch again",
                    );
                    return self.end("ended", status).await;
                }
                Wake::Reloaded => {
                    if let Err(status) = self.recheck() {
                        return self.end("revoked", status).await;
                    }
                }
                Wake::EntryGone => {
                    // The identity was removed, or its credential replaced,
                    // by a reload.
                    let status = self.recheck().err().unwrap_or_else(|| {
                        Status::unavailable(
                            "this identity's credential was replaced by a configuration reload; \
                             watch again for tokens from the new one",
                        )
                    });
                    return self.end("ended", status).await;
                }
                Wake::Token => {
                    let token = self.tokens.borrow_and_update().clone();
                    let Some(token) = token else { continue };
                    if let Err(status) = self.recheck() {
                        return self.end("revoked", status).await;
                    }
                    let token = K::to_proto(&token, &self.key);
                    let mut line = self.audit.stream_event("refresh");
                    line.decision = self.audit.decision;
                    K::finish(&mut line, Ok(&token));
                    if self.sender.send(Ok(token)).await.is_err() {
                        return self.close();
                    }
                }
            }
        }
    }

    /// The grant as of now.
    fn recheck(&mut self) -> Result<(), Status> {
        K::grant(&self.live, &self.cache, &mut self.audit, &self.key)
    }

    /// Ends the stream with `status`, and says so in the audit log.
    async fn end(self, event: &'static str, status: Status) {
        let mut line = self.audit.stream_event(event);
        line.decision = self.audit.decision;
        K::finish(&mut line, Err(&status));
        let _ = self.sender.send(Err(status)).await;
    }

    /// The client went away.
    fn close(self) {
        let mut line = self.audit.stream_event("closed");
        line.decision = self.audit.decision;
        line.write(
            tonic::Code::Cancelled,
            None,
            Some("the client closed the stream"),
        );
    }
}
