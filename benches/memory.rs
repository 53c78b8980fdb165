//! Memory per cache entry (issue 16, point 4): the cache engine filled with
//! N distinct audiences, each holding a realistic ~1 KB ID token, and what
//! each entry costs beyond the token's own bytes.
//!
//! Run with `cargo bench --bench memory`. Sizes: `BENCH_MEMORY_SIZES`
//! (comma-separated entry counts, default `10000,100000`, filled one after
//! the other into the same cache), `BENCH_MEMORY_CONCURRENCY` (16 tasks
//! asking at once), `BENCH_MEMORY_SETTLE_MS` (500: the pause before each
//! reading).
//!
//! Arrangement: the real `TokenCache` on a 2-worker tokio runtime, in this
//! process, with an in-process stand-in source (no network, no RSA: a
//! 100,000-entry fill takes seconds, and only the cache's own memory
//! moves) answering tokens shaped like Google's: an RS256 header with a
//! `kid`, the claims the emulator's metadata server puts in (`iss`, `aud`,
//! `azp`, `sub`, `iat`, `exp`, `jti`, `email`, `email_verified`) and a
//! 256-byte signature, about 1,000 bytes of JWT text. The source counts the
//! token bytes it hands out, so "beyond the token" subtracts what the
//! entries actually hold.
//!
//! Three figures per reading, all of this process:
//! - **heap requested**: bytes live in `malloc` as Rust asked for them
//!   (a counting wrapper around the system allocator);
//! - **malloc in use**: glibc's own count (`mallinfo2`: `uordblks` +
//!   `hblkhd`), which adds each chunk's header and rounding;
//! - **RSS**: `VmRSS` from `/proc/self/status`, which adds free memory the
//!   allocator has not returned (fragmentation) and the runtime's stacks.
//!
//! Also the runtime's live tasks (`num_alive_tasks`): an engine with a task
//! per entry shows one per entry.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it fills 2,000
//! entries and asserts what the engine promises: no task per entry, and at
//! most [`MAX_OVERHEAD_PER_ENTRY`] bytes of heap per entry beyond the token.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use rand::RngCore;

mod common;

use common::{env_usize, mib, runtime};
use token_broker::{
    cache::{CacheKey, TokenCache},
    clock::Clock,
    config::RefreshSettings,
    domain::SourceKind,
    source::{FetchFuture, IdTokenSource},
    token::IdToken,
};

/// The bound issue 16 sets: heap per entry beyond the token's bytes.
const MAX_OVERHEAD_PER_ENTRY: f64 = 1536.0;

/// Counts the bytes live in the system allocator, as requested.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A stand-in for the metadata server: a fresh, Google-shaped token per
/// call, signed with random bytes (the cache does not verify signatures).
struct StandIn {
    kid: String,
    token_bytes: AtomicU64,
    calls: AtomicUsize,
}

impl StandIn {
    fn new() -> Self {
        Self {
            kid: random_hex(20),
            token_bytes: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    fn mint(&self, audience: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": "https://accounts.google.com",
            "aud": audience,
            "azp": "109876543210987654321",
            "sub": "109876543210987654321",
            "iat": now,
            "exp": now + 3600,
            "jti": random_hex(20),
            "email": "broker-bench@example-project.iam.gserviceaccount.com",
            "email_verified": true,
        });
        let mut signature = [0u8; 256];
        rand::rng().fill_bytes(&mut signature);
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }
}

impl IdTokenSource for StandIn {
    fn fetch<'a>(&'a self, audience: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            let jwt = self.mint(audience);
            let token = IdToken::parse(&jwt, audience, SystemTime::now())
                .expect("the stand-in's token parses");
            self.token_bytes
                .fetch_add(token.expose().len() as u64, Ordering::Relaxed);
            self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(token)
        })
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Metadata
    }

    fn upstream(&self) -> &str {
        "in-process stand-in"
    }
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// One reading of this process's memory.
#[derive(Debug, Clone, Copy)]
struct Reading {
    entries: usize,
    heap: i64,
    malloc: u64,
    rss_kib: u64,
    tasks: usize,
    token_bytes: u64,
}

fn malloc_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

fn rss_kib() -> u64 {
    common::rss_kib(std::process::id()).0
}

fn audience(i: usize) -> String {
    // The Cloud Run–style audiences the other benches use (45 bytes).
    format!("https://service-{i:06}-abcdefghij-uc.a.run.app")
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = if measuring {
        std::env::var("BENCH_MEMORY_SIZES")
            .unwrap_or_else(|_| "10000,100000".into())
            .split(',')
            .map(|s| {
                s.trim()
                    .replace('_', "")
                    .parse()
                    .expect("BENCH_MEMORY_SIZES")
            })
            .collect()
    } else {
        vec![2_000]
    };
    let concurrency = env_usize("BENCH_MEMORY_CONCURRENCY", 16).max(1);
    let settle = Duration::from_millis(env_usize("BENCH_MEMORY_SETTLE_MS", 500) as u64);
    let largest = sizes.iter().copied().max().unwrap_or(0);

    let rt = runtime("cache", 2);
    let source = Arc::new(StandIn::new());
    let settings = RefreshSettings {
        max_entries: largest.max(1),
        upstream_qps: 1_000_000,
        ..RefreshSettings::default()
    };
    let cache = TokenCache::new(
        [(
            "default".to_owned(),
            source.clone() as Arc<dyn IdTokenSource>,
        )],
        settings,
        Clock::system(),
    );

    let read = |entries: usize| -> Reading {
        std::thread::sleep(settle);
        Reading {
            entries,
            heap: LIVE.load(Ordering::Relaxed),
            malloc: malloc_in_use(),
            rss_kib: rss_kib(),
            tasks: rt.metrics().num_alive_tasks(),
            token_bytes: source.token_bytes.load(Ordering::Relaxed),
        }
    };

    let idle = read(0);
    let mut readings = Vec::new();
    let mut filled = 0;
    for &size in &sizes {
        let next = Arc::new(AtomicUsize::new(filled));
        let started = std::time::Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let cache = cache.clone();
                    let next = next.clone();
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= size {
                                break;
                            }
                            let key = CacheKey::new("default", &audience(i)).expect("audience");
                            cache
                                .get(&key, Duration::ZERO)
                                .await
                                .expect("a token from the stand-in");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("fill task");
            }
        });
        filled = size.max(filled);
        assert_eq!(cache.len(), filled, "every audience is cached");
        assert_eq!(
            source.calls.load(Ordering::Relaxed),
            filled,
            "one fetch each"
        );
        eprintln!(
            "filled {filled} entries in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        readings.push(read(filled));
    }

    println!(
        "idle: RSS {:.1} MiB, malloc in use {:.1} MiB, heap requested {:.1} MiB, {} tasks",
        mib(idle.rss_kib),
        idle.malloc as f64 / 1048576.0,
        idle.heap as f64 / 1048576.0,
        idle.tasks
    );
    println!(
        "| entries | RSS MiB | tasks | token B/entry | RSS B/entry | beyond token (RSS) | malloc B/entry | beyond token (malloc) | heap B/entry | beyond token (heap) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &readings {
        let n = r.entries as f64;
        let token = r.token_bytes as f64 / n;
        let rss = (r.rss_kib as f64 - idle.rss_kib as f64) * 1024.0 / n;
        let malloc = (r.malloc as f64 - idle.malloc as f64) / n;
        let heap = (r.heap - idle.heap) as f64 / n;
        println!(
            "| {} | {:.1} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.entries,
            mib(r.rss_kib),
            r.tasks,
            token,
            rss,
            rss - token,
            malloc,
            malloc - token,
            heap,
            heap - token
        );
    }

    if !measuring {
        let r = readings.last().expect("one reading");
        let n = r.entries as f64;
        let beyond = (r.heap - idle.heap) as f64 / n - r.token_bytes as f64 / n;
        assert!(
            r.tasks <= idle.tasks + 4,
            "{} entries left {} live tasks (idle: {}): the engine keeps a task per entry",
            r.entries,
            r.tasks,
            idle.tasks
        );
        assert!(
            beyond <= MAX_OVERHEAD_PER_ENTRY,
            "each entry holds {beyond:.0} heap bytes beyond its token (bound {MAX_OVERHEAD_PER_ENTRY})"
        );
    }
}
