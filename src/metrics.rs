//! Prometheus metrics. One process-wide set, as a daemon has one of each
//! thing it counts; labels are bounded (identities come from the config,
//! results and outcomes are fixed sets; never audiences, which clients
//! choose).

use std::{
    cell::RefCell,
    collections::HashSet,
    sync::{Mutex, OnceLock},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub identity: &'static str,
    /// gRPC status name, e.g. "OK", "PERMISSION_DENIED".
    pub result: &'static str,
    /// hit, stale, miss, wait, or none (refused before the cache).
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub identity: &'static str,
    /// metadata, service_account_key, impersonate or external_account (per
    /// identity); for `upstream_hops`: metadata, service_account_key,
    /// authorized_user, sts or iam (per hop).
    pub source: &'static str,
    /// ok, rejected, unavailable, invalid_response.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub identity: &'static str,
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// ok, or error.
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_duration: Family<SourceLabels, Histogram>,
    /// Each upstream call made for an identity built on others, by hop.
    pub upstream_hops: Family<UpstreamLabels, Counter>,
    pub refresh_failures: Family<IdentityLabels, Counter>,
    pub policy_denials: Family<IdentityLabels, Counter>,
    pub cache_entries: Gauge,
    pub min_time_to_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub connected_clients: Gauge,
    pub log_lines_dropped: Counter,
    /// Pod-list fetches from the kubelet (`[kubernetes]`).
    pub kubelet_fetches: Family<OutcomeLabels, Counter>,
}

fn upstream_histogram() -> Histogram {
    // 5 ms to about 20 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// A label value for a configured identity name, without allocating per
/// request. Names are interned once each; only configured names (bounded by
/// the config, reloads included) and "unknown" ever reach here.
pub fn identity_label(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(interned) = names.get(name) {
        return interned;
    }
    let interned: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(interned);
    interned
}

/// Counts one client request in `requests`. Every label is a `&'static
/// str`, so each thread keeps the counters it used by the labels'
/// addresses, and a request pays neither the family's lock nor its label
/// hash (a few of these per request showed in profiles). Equal labels at
/// other addresses only make a second handle on the same counter.
pub fn count_request(labels: RequestLabels) {
    /// Label sets remembered per thread; past this, the family is asked.
    const KEPT: usize = 64;
    thread_local! {
        static COUNTERS: RefCell<Vec<(RequestLabels, Counter)>> = const { RefCell::new(Vec::new()) };
    }
    let same = |a: &RequestLabels| {
        std::ptr::eq(a.method, labels.method)
            && std::ptr::eq(a.identity, labels.identity)
            && std::ptr::eq(a.result, labels.result)
            && std::ptr::eq(a.cache, labels.cache)
    };
    COUNTERS.with(|counters| {
        let Ok(mut counters) = counters.try_borrow_mut() else {
            get().requests.get_or_create(&labels).inc();
            return;
        };
        if let Some((_, counter)) = counters.iter().find(|(kept, _)| same(kept)) {
            counter.inc();
            return;
        }
        let counter = get().requests.get_or_create(&labels).clone();
        counter.inc();
        if counters.len() < KEPT {
            counters.push((labels, counter));
        }
    });
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("token_broker");
        let m = Metrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_histogram),
            upstream_hops: Family::default(),
            refresh_failures: Family::default(),
            policy_denials: Family::default(),
            cache_entries: Gauge::default(),
            min_time_to_expiry: Gauge::default(),
            connected_clients: Gauge::default(),
            log_lines_dropped: Counter::default(),
            kubelet_fetches: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Client requests by method, identity, result and cache outcome",
            m.requests.clone(),
        );
        registry.register(
            "upstream_requests",
            "Upstream token fetches by identity, source and outcome",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Latency of upstream token fetches, retries included",
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_hops",
            "Upstream calls by identity, hop (metadata, service_account_key, sts, iam) and outcome, access tokens for chained identities included",
            m.upstream_hops.clone(),
        );
        registry.register(
            "refresh_failures",
            "Failed refreshes of a key that held a token",
            m.refresh_failures.clone(),
        );
        registry.register(
            "kubelet_fetches",
            "Pod-list fetches from the kubelet, by outcome (ok, error)",
            m.kubelet_fetches.clone(),
        );
        registry.register(
            "policy_denials",
            "Requests denied by the access policy",
            m.policy_denials.clone(),
        );
        registry.register(
            "cache_entries",
            "Cached (identity, audience) entries",
            m.cache_entries.clone(),
        );
        registry.register(
            "token_min_time_to_expiry_seconds",
            "Smallest time to expiry among cached tokens (0 when none)",
            m.min_time_to_expiry.clone(),
        );
        registry.register(
            "connected_clients",
            "Open client connections on the socket",
            m.connected_clients.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up \
             (served-request audit lines and debug lines only, unless the output is wedged)",
            m.log_lines_dropped.clone(),
        );
        Metrics { registry, ..m }
    })
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counters_count_into_the_family_whatever_the_label_addresses() {
        let labels = RequestLabels {
            method: "CountRequestTest",
            identity: "default",
            result: "OK",
            cache: "hit",
        };
        let elsewhere: &'static str = String::from("CountRequestTest").leak();
        for _ in 0..3 {
            count_request(labels);
        }
        count_request(RequestLabels {
            method: elsewhere,
            ..labels
        });
        std::thread::spawn(move || count_request(labels))
            .join()
            .unwrap();
        assert_eq!(get().requests.get_or_create(&labels).get(), 5);
        let text = get().encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("CountRequestTest"))
            .collect();
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].ends_with(" 5"), "{series:?}");
    }
}
