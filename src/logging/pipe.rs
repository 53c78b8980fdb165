//! The log pipe: takes writing off the request path. Each event is
//! formatted once by the subscriber, copied into a recycled buffer and
//! queued; one thread writes the queue out in batches, one `write` per
//! batch rather than per line.
//!
//! The queue is bounded. When it is full:
//! - lines a flood can afford to lose ([`Keep::Droppable`]: served-request
//!   audit lines, debug and trace) are dropped at once and counted, so a
//!   request never waits on the log;
//! - every other line (denials, errors, warnings, lifecycle) waits for room,
//!   at most [`KEEP_WAIT`], and is only dropped, and counted, if the output
//!   itself is wedged that long.
//!
//! Dropped lines are counted in `token_broker_log_lines_dropped_total` and
//! reported by a warning line at most every [`DROP_REPORT_EVERY`].

use std::{
    collections::VecDeque,
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

/// Lines held before droppable lines start being dropped.
pub const CAPACITY: usize = 16 * 1024;
/// Longest a line that must be kept waits for room in the queue.
pub const KEEP_WAIT: Duration = Duration::from_secs(1);
/// How often, at most, dropped lines are reported.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long the writer lets lines gather after being woken.
const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Buffers kept for reuse; beyond this they are freed.
const POOL: usize = 1024;

/// Whether a line may be dropped when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Waits (briefly) for room.
    Always,
    /// Dropped at once when the queue is full.
    Droppable,
}

struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// Lines queued so far, and lines the writer has finished with.
    queued: u64,
    written: u64,
    /// The writer waits for lines: the next sender wakes it. While it is
    /// busy, senders only queue, so a flood costs no wake-up per line.
    writer_asleep: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    not_empty: Condvar,
    not_full: Condvar,
    /// Written out, or lost: wakes [`Pipe::flush`].
    progress: Condvar,
    pool: Mutex<Vec<Vec<u8>>>,
    dropped: AtomicU64,
    /// Told of each dropped line at once (the metric), not when the
    /// writer next gets to report, which a wedged output delays.
    on_drop: fn(u64),
    capacity: usize,
}

/// The sending end, shared by every thread that logs.
#[derive(Clone)]
pub struct Pipe {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep logging.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pipe {
    /// Starts the writer thread, writing to `out`. `on_drop` is called with
    /// the number of lines whenever lines are dropped (for the metric).
    pub fn start(
        capacity: usize,
        out: Box<dyn Write + Send>,
        on_drop: fn(u64),
    ) -> std::io::Result<Pipe> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                lines: VecDeque::with_capacity(capacity.min(4096)),
                queued: 0,
                written: 0,
                writer_asleep: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            progress: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            on_drop,
            capacity: capacity.max(1),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_out(&writer, out))?;
        Ok(Pipe { shared })
    }

    /// A cleared buffer, recycled when one is free.
    pub fn buffer(&self) -> Vec<u8> {
        lock(&self.shared.pool).pop().unwrap_or_default()
    }

    /// Queues one formatted line (ownership of `line` passes to the pipe).
    pub fn send(&self, line: Vec<u8>, keep: Keep) {
        let shared = &*self.shared;
        let mut queue = lock(&shared.queue);
        if queue.lines.len() >= shared.capacity {
            if keep == Keep::Droppable {
                drop(queue);
                self.lost(line);
                return;
            }
            let deadline = Instant::now() + KEEP_WAIT;
            while queue.lines.len() >= shared.capacity {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(queue);
                    self.lost(line);
                    return;
                }
                queue = shared
                    .not_full
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        queue.lines.push_back(line);
        queue.queued += 1;
        let wake = std::mem::replace(&mut queue.writer_asleep, false);
        drop(queue);
        if wake {
            shared.not_empty.notify_one();
        }
    }

    fn lost(&self, line: Vec<u8>) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        (self.shared.on_drop)(1);
        recycle(&self.shared, line);
    }

    /// Lines dropped since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before this call is written, or
    /// `timeout` passes. Used before the process exits.
    pub fn flush(&self, timeout: Duration) -> bool {
        let shared = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut queue = lock(&shared.queue);
        let target = queue.queued;
        while queue.written < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            shared.not_empty.notify_one();
            queue = shared
                .progress
                .wait_timeout(queue, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

fn recycle(shared: &Shared, mut line: Vec<u8>) {
    // Oversized buffers (a huge error text) are not worth keeping.
    if line.capacity() <= 16 * 1024 {
        line.clear();
        let mut pool = lock(&shared.pool);
        if pool.len() < POOL {
            pool.push(line);
        }
    }
}

/// The writer thread: takes everything queued, writes it in one go, and
/// reports dropped lines now and then.
fn write_out(shared: &Shared, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut batch = VecDeque::new();
    let mut reported = 0;
    let mut last_report: Option<Instant> = None;
    loop {
        {
            let mut queue = lock(&shared.queue);
            if queue.lines.is_empty() {
                queue.writer_asleep = true;
                queue = shared
                    .not_empty
                    .wait_timeout(queue, DROP_REPORT_EVERY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                queue.writer_asleep = false;
                if !queue.lines.is_empty() {
                    // Woken by a line: let a batch gather behind it, so a
                    // steady stream of requests wakes this thread (a futex
                    // call in the sender) once per window, not once per line.
                    drop(queue);
                    std::thread::sleep(BATCH_WINDOW);
                    queue = lock(&shared.queue);
                }
            }
            std::mem::swap(&mut batch, &mut queue.lines);
        }
        shared.not_full.notify_all();
        let count = batch.len() as u64;
        for line in batch.drain(..) {
            // A failed write (stderr closed) loses the line, and nothing else
            // can be done about it; keep draining so callers never block.
            let _ = out.write_all(&line);
            recycle(shared, line);
        }
        let dropped = shared.dropped.load(Ordering::Relaxed);
        let due = last_report.is_none_or(|at| at.elapsed() >= DROP_REPORT_EVERY);
        if dropped > reported && due {
            let _ = writeln!(
                out,
                "WARN token_broker::logging: {} log line(s) dropped: the log output could not keep up \
                 ({} in all; served-request audit lines go first, denials and errors wait up to {:?})",
                dropped - reported,
                dropped,
                KEEP_WAIT
            );
            reported = dropped;
            last_report = Some(Instant::now());
        }
        let _ = out.flush();
        let mut queue = lock(&shared.queue);
        queue.written += count;
        drop(queue);
        shared.progress.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that holds every write until the test opens the gate.
    struct Gated {
        gate: Gate,
        /// Told each time the writer reaches the output, before the gate.
        entered: mpsc::Sender<()>,
        seen: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let (open, cv) = &*self.gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            let _ = self.seen.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    type Gate = Arc<(Mutex<bool>, Condvar)>;

    struct GatedPipe {
        pipe: Pipe,
        gate: Gate,
        entered: mpsc::Receiver<()>,
        received: mpsc::Receiver<Vec<u8>>,
    }

    impl GatedPipe {
        /// Sends `first` and returns once the writer has taken it and is
        /// held at the gate, so the queue behind it is empty.
        fn hold_writer(&self) {
            self.pipe.send(line("first"), Keep::Always);
            self.entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the writer reaches its output");
        }
    }

    fn gated() -> GatedPipe {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (seen, received) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let out = Gated {
            gate: gate.clone(),
            entered: entered_tx,
            seen,
        };
        // BufWriter holds 64 KiB: lines reach Gated only on flush.
        GatedPipe {
            pipe: Pipe::start(4, Box::new(out), |_| {}).unwrap(),
            gate,
            entered,
            received,
        }
    }

    fn open(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    fn line(text: &str) -> Vec<u8> {
        format!("{text}\n").into_bytes()
    }

    #[test]
    fn a_full_queue_drops_droppable_lines_at_once_and_keeps_the_rest() {
        let gated = gated();
        let (pipe, gate, received) = (&gated.pipe, &gated.gate, &gated.received);
        // The writer takes the first batch and blocks on the gate; fill the
        // queue behind it.
        gated.hold_writer();
        for i in 0..4 {
            pipe.send(line(&format!("queued {i}")), Keep::Always);
        }
        let t0 = Instant::now();
        for _ in 0..1000 {
            pipe.send(line("hit"), Keep::Droppable);
        }
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "droppable lines never wait"
        );
        assert_eq!(pipe.dropped(), 1000);
        // A denial waits for room; open the gate while it waits.
        let sender = pipe.clone();
        let waiting = std::thread::spawn(move || sender.send(line("denied"), Keep::Always));
        std::thread::sleep(Duration::from_millis(50));
        open(gate);
        waiting.join().unwrap();
        assert!(pipe.flush(Duration::from_secs(5)));
        let written: String = received
            .try_iter()
            .map(|b| String::from_utf8(b).unwrap())
            .collect();
        assert!(written.contains("denied"), "{written}");
        assert!(written.contains("queued 3"), "{written}");
        assert_eq!(pipe.dropped(), 1000, "the kept line was not dropped");
    }

    #[test]
    fn a_wedged_output_bounds_the_wait_of_kept_lines() {
        let gated = gated();
        let (pipe, gate) = (&gated.pipe, &gated.gate);
        gated.hold_writer();
        for i in 0..4 {
            pipe.send(line(&format!("queued {i}")), Keep::Always);
        }
        let t0 = Instant::now();
        pipe.send(line("denied"), Keep::Always);
        let waited = t0.elapsed();
        assert!(waited >= KEEP_WAIT && waited < KEEP_WAIT * 3, "{waited:?}");
        assert_eq!(pipe.dropped(), 1);
        open(gate);
    }

    #[test]
    fn flush_writes_everything_in_order() {
        let gated = gated();
        let (pipe, gate, received) = (&gated.pipe, &gated.gate, &gated.received);
        open(gate);
        for i in 0..100 {
            pipe.send(line(&format!("{i}")), Keep::Always);
        }
        assert!(pipe.flush(Duration::from_secs(5)));
        let written: String = received
            .try_iter()
            .map(|b| String::from_utf8(b).unwrap())
            .collect();
        let expected: String = (0..100).map(|i| format!("{i}\n")).collect();
        assert_eq!(written, expected);
    }
}
