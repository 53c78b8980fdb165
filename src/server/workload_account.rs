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

use super::{
    admission::{self, Refused},
    live::Live,
    peer::PeerCredentials,
};
use crate::{
    cache::{CacheError, CacheKey, TokenCache},
    config::{validate_account_email, AccountFrom},
    domain::LogText,
    kubernetes::PodDirectory,
    policy::Decision,
    source::access::AccessOf,
};

/// The ID-token key for `peer`'s request of (`identity`, `audience`): for
/// a per-workload identity, once the policy granted it, minted as the
/// caller's account. Not yet admitted: pass it to
/// [`admission::admit_key`].
pub async fn key_for(
    cache: &TokenCache,
    live: &Live,
    pods: Option<&PodDirectory>,
    peer: &PeerCredentials,
    identity: &str,
    audience: &str,
    decision: &mut Option<Decision>,
) -> Result<CacheKey, Refused> {
    let key = CacheKey::new(identity, audience).map_err(CacheError::from)?;
    if cache
        .source(identity)
        .and_then(|s| s.account_from())
        .is_none()
    {
        return Ok(key);
    }
    // The policy first: a caller it denies never makes the broker read the
    // API server.
    admission::grant(cache, live, peer, identity, audience, decision)?;
    Ok(match resolve(cache, pods, peer, identity).await? {
        Some(account) => key.minted_as(&account),
        None => key,
    })
}

/// The access-token key for `peer`'s request of `identity`'s token for
/// `scopes` (space-separated, any order): the scope set checked and, for a
/// per-workload identity, once the policy granted the identity and every
/// scope, minted as the caller's account. Not yet admitted: pass it to
/// [`admission::admit_access`].
pub async fn access_key_for(
    cache: &TokenCache,
    live: &Live,
    pods: Option<&PodDirectory>,
    peer: &PeerCredentials,
    identity: &str,
    scopes: &str,
    decision: &mut Option<Decision>,
) -> Result<CacheKey, Refused> {
    let key = CacheKey::access(identity, AccessOf::Identity, scopes)
        .map_err(CacheError::InvalidScopes)?;
    if cache
        .source(identity)
        .and_then(|s| s.account_from())
        .is_none()
    {
        return Ok(key);
    }
    // The policy first, as for ID tokens: a caller it denies never makes
    // the broker read the API server.
    admission::grant_access(cache, live, peer, &key, decision)?;
    Ok(match resolve(cache, pods, peer, identity).await? {
        Some(account) => key.minted_as(&account),
        None => key,
    })
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
