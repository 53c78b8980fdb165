//! The account a per-workload identity (`service_account_from`) mints as
//! for one caller: the Google service account named by the
//! `iam.gke.io/gcp-service-account` annotation of the Kubernetes service
//! account of the caller's attested pod, read from the API server through
//! the pod directory (cached there for `kubernetes.annotations_ttl`).
//!
//! Both token kinds use it: an ID token for an audience and an access
//! token for a scope set are each minted as the caller's account.
//!
//! Asked only after the policy granted the identity, so a denied caller
//! never makes the broker read the API server. The result goes into the
//! cache key ([`crate::cache::CacheKey::minted_as`]): two pods whose
//! annotations differ never share a token, and a changed annotation is a
//! new key once the annotation cache has expired.

use std::time::Duration;

use super::{
    admission::{self, Refused},
    live::Live,
    peer::PeerCredentials,
};
use crate::{
    cache::{CacheKey, TokenCache},
    config::{validate_account_email, AccountFrom},
    domain::LogText,
    kubernetes::PodDirectory,
    policy::Decision,
};

/// Where one request's admission writes what its audit line tells: the
/// policy's decision, and the account a per-workload identity mints as.
pub struct Record<'a> {
    pub decision: &'a mut Option<Decision>,
    pub minted_as: &'a mut Option<String>,
}

/// Admits `peer`'s request for `key` (an ID-token or access-token key as
/// the request named it) with `min_valid`, and returns the key to look up.
/// For a per-workload identity, the policy is asked first, so a caller it
/// denies never makes the broker read the API server; then the key is
/// minted as the caller's account, and only that key spends from the
/// caller's budget. Every other identity goes straight to
/// [`admission::admit_key`].
pub async fn admit(
    cache: &TokenCache,
    live: &Live,
    pods: Option<&PodDirectory>,
    peer: &PeerCredentials,
    key: CacheKey,
    min_valid: Duration,
    record: Record<'_>,
) -> Result<CacheKey, Refused> {
    let per_workload = cache
        .source(key.identity())
        .and_then(|s| s.account_from())
        .is_some();
    if !per_workload {
        return admission::admit_key(cache, live, peer, key, min_valid, record.decision);
    }
    admission::grant_key(cache, live, peer, &key, record.decision)?;
    let key = match resolve(cache, pods, peer, key.identity()).await? {
        Some(account) => key.minted_as(&account),
        None => key,
    };
    *record.minted_as = key.account().map(str::to_owned);
    admission::spend_for_new_key(cache, live, peer, key, min_valid)
}

/// `Ok(None)` for an identity with an account of its own; the caller's
/// account for a per-workload identity; or why it has none.
pub async fn resolve(
    cache: &TokenCache,
    pods: Option<&PodDirectory>,
    peer: &PeerCredentials,
    identity: &str,
) -> Result<Option<String>, Refused> {
    let Some(from) = cache.source(identity).and_then(|s| s.account_from()) else {
        return Ok(None);
    };
    match from {
        AccountFrom::K8sServiceAccountAnnotation => {
            annotated_account(pods, peer, identity, from.annotation()).await
        }
    }
}

async fn annotated_account(
    pods: Option<&PodDirectory>,
    peer: &PeerCredentials,
    identity: &str,
    annotation: &str,
) -> Result<Option<String>, Refused> {
    let no_account = |why: String| Refused::NoWorkloadAccount {
        message: format!(
            "identity {} mints as the Google service account named by the caller's Kubernetes \
             service account annotation {annotation}, and {why}",
            LogText::new(identity)
        ),
    };
    let workload = peer
        .attestation
        .as_deref()
        .and_then(crate::attest::Attestation::workload);
    let Some(pod) = workload.and_then(|w| w.k8s_pod.as_deref()) else {
        let why = workload
            .and_then(|w| w.k8s_unattested.clone())
            .unwrap_or_else(|| "the caller is not in a pod the kubelet lists".into());
        return Err(no_account(format!(
            "the caller is not an attested Kubernetes pod ({why})"
        )));
    };
    let service_account = format!("{}/{}", pod.namespace, pod.service_account);
    let Some(pods) = pods else {
        return Err(no_account("no [kubernetes] section is configured".into()));
    };
    let annotations = pods
        .service_account_annotations(&pod.namespace, &pod.service_account)
        .await
        .map_err(|error| Refused::WorkloadAccountUnavailable {
            message: format!(
                "cannot read the annotations of service account {service_account} for \
                 identity {}: {error}",
                LogText::new(identity)
            ),
        })?;
    let Some(account) = annotations.get(annotation) else {
        return Err(no_account(format!(
            "service account {service_account} has no such annotation: annotate it \
             (kubectl -n {} annotate serviceaccount {} {annotation}=NAME@PROJECT.iam.gserviceaccount.com)",
            pod.namespace, pod.service_account
        )));
    };
    validate_account_email(account).map_err(|_| {
        no_account(format!(
            "service account {service_account}'s annotation holds {}, which is not a service \
             account email",
            LogText::new(account)
        ))
    })?;
    Ok(Some(account.clone()))
}
