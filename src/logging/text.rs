//! The text log format, written without `core::fmt` machinery on the path
//! every audit line takes. Its output is byte for byte tracing-subscriber's
//! default (`Format<Full, SystemTime>` without ANSI): timestamp, level,
//! target, message, `name=value` fields, with the same quoting, escaping and
//! message sanitizing. That formatter spends most of an audit line's cost on
//! styling calls that write nothing when ANSI is off, a calendar computation
//! per timestamp, and `Debug` formatting of every string; here the date is
//! computed once a second, and strings that need no escaping (nearly all)
//! are copied as they are.
//!
//! Lines this does not handle itself are handed to the default formatter:
//! ANSI output (a terminal), events inside spans, and records from the `log`
//! crate, whose metadata the default formatter normalizes.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{
    field::{Field, Visit},
    Event, Level, Subscriber,
};
use tracing_subscriber::{
    fmt::{
        format::{DefaultVisitor, Format, Full, Writer},
        time::SystemTime as DefaultTimer,
        FmtContext, FormatEvent, FormatFields,
    },
    registry::LookupSpan,
};

/// The default text format, fast on the lines the broker writes.
#[derive(Default)]
pub struct TextFormat {
    fallback: Format<Full, DefaultTimer>,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        thread_local! {
            /// The line being built: plain `String` pushes, one write out.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let meta = event.metadata();
        if writer.has_ansi_escapes()
            || !writer.sanitizes_ansi_escapes()
            || meta.target() == "log"
            || ctx.event_scope().is_some()
        {
            return self.fallback.format_event(ctx, writer, event);
        }
        let written = LINE.with(|line| {
            // Busy only if formatting a field logged an event itself.
            let Ok(mut line) = line.try_borrow_mut() else {
                return Ok(false);
            };
            line.clear();
            if !push_timestamp(&mut line, SystemTime::now()) {
                return Ok(false);
            }
            line.push_str(level_text(meta.level()));
            line.push_str(meta.target());
            line.push_str(": ");
            let mut fields = Fields {
                line: &mut line,
                empty: true,
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
            line.push('\n');
            writer.write_str(&line)?;
            if line.capacity() > 16 * 1024 {
                // Do not keep one huge line's buffer per thread.
                *line = String::new();
            }
            Ok(true)
        })?;
        if written {
            Ok(())
        } else {
            self.fallback.format_event(ctx, writer, event)
        }
    }
}

/// The level as the default formatter pads it, and the space after it.
fn level_text(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE ",
        Level::DEBUG => "DEBUG ",
        Level::INFO => " INFO ",
        Level::WARN => " WARN ",
        _ => "ERROR ",
    }
}

/// Pushes `2026-11-27T10:07:15.934275Z ` for `now`. Returns `false`,
/// having pushed nothing, for a time the fast path does not cover (before
/// 1970 or after 9999), which the default formatter then writes.
fn push_timestamp(line: &mut String, now: SystemTime) -> bool {
    thread_local! {
        /// The second last formatted on this thread and its text up to
        /// and including the `.`.
        static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
    }
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        return false;
    };
    let secs = since_epoch.as_secs();
    if secs >= 253_402_300_800 {
        // 10000-01-01: the year would need more than four digits.
        return false;
    }
    let prefix = SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            *cell = (secs, second_text(secs));
        }
        cell.1
    });
    let mut tail = [0u8; 8];
    digits(&mut tail[..6], u64::from(since_epoch.subsec_micros()));
    tail[6] = b'Z';
    tail[7] = b' ';
    push_ascii(line, &prefix);
    push_ascii(line, &tail);
    true
}

/// Pushes bytes the caller built from ASCII digits and punctuation.
fn push_ascii(line: &mut String, ascii: &[u8]) {
    // Always valid: ASCII is UTF-8.
    line.push_str(std::str::from_utf8(ascii).unwrap_or_default());
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (UTC).
fn second_text(secs: u64) -> [u8; 20] {
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.";
    digits(&mut out[0..4], year);
    digits(&mut out[5..7], month);
    digits(&mut out[8..10], day);
    digits(&mut out[11..13], of_day / 3600);
    digits(&mut out[14..16], of_day % 3600 / 60);
    digits(&mut out[17..19], of_day % 60);
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `value` in decimal, zero-padded to fill `out` (its high digits are cut
/// if it does not fit, which callers rule out).
fn digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Writes an event's fields as the default `DefaultVisitor` does.
struct Fields<'a> {
    line: &'a mut String,
    empty: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// The separator and `name=`; `false` for a field not written at all.
    fn begin(&mut self, field: &Field) -> bool {
        let name = field.name();
        // Log-record metadata (the default visitor skips it too).
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        self.separate();
        self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.line.push('=');
        true
    }

    fn separate(&mut self) {
        if self.empty {
            self.empty = false;
        } else {
            self.line.push(' ');
        }
    }

    /// Everything the fast path does not cover, by the default visitor.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let mut visitor = DefaultVisitor::new(Writer::new(self.line), self.empty);
        record(&mut visitor);
        self.result = tracing_subscriber::field::VisitOutput::finish(visitor);
        self.empty = false;
    }

    fn message(&mut self, message: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.separate();
        self.result = write!(Sanitizing(self.line), "{message:?}");
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.message(&format_args!("{value}"));
        }
        if self.begin(field) {
            self.result = push_quoted(self.line, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "message" {
            return self.message(&value);
        }
        if self.begin(field) {
            push_u64(self.line, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "message" {
            return self.message(&value);
        }
        if self.begin(field) {
            if value < 0 {
                self.line.push('-');
            }
            push_u64(self.line, value.unsigned_abs());
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "message" {
            return self.message(&value);
        }
        if self.begin(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.delegate(field, |v| v.record_f64(field, value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.delegate(field, |v| v.record_i128(field, value));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.delegate(field, |v| v.record_u128(field, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.delegate(field, |v| v.record_bytes(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.message(value);
        }
        if self.begin(field) {
            self.result = write!(self.line, "{value:?}");
        }
    }
}

/// `value` as `{:?}` writes a `str`: quoted, with quotes, backslashes and
/// anything not printable ASCII escaped. Text that needs no escaping
/// (printable ASCII without `"` or `\`) is pushed as it is.
fn push_quoted(line: &mut String, value: &str) -> fmt::Result {
    if needs_escaping(value.as_bytes()) {
        return write!(line, "{value:?}");
    }
    line.reserve(value.len() + 2);
    line.push('"');
    line.push_str(value);
    line.push('"');
    Ok(())
}

/// Whether any byte is outside printable ASCII or is `"` or `\`. No
/// early exit, so the compiler checks many bytes per instruction (a
/// hand-written eight-bytes-at-a-time version measured no faster).
fn needs_escaping(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |found, &b| {
        found | !(b' '..=b'~').contains(&b) | (b == b'"') | (b == b'\\')
    })
}

fn push_u64(line: &mut String, value: u64) {
    let mut buffer = [0u8; 20];
    let mut at = buffer.len();
    let mut rest = value;
    loop {
        at -= 1;
        buffer[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    push_ascii(line, &buffer[at..]);
}

/// Escapes what a message could use to drive a terminal, exactly as the
/// default formatter's message sanitizing does: ESC, BEL, BS, FF, DEL and
/// the C1 controls.
struct Sanitizing<'a>(&'a mut String);

impl fmt::Write for Sanitizing<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // C1 controls are U+0080..U+009F: 0xC2 0x80..=0x9F in UTF-8.
        let clean = !text
            .bytes()
            .any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2));
        if clean {
            self.0.push_str(text);
            return Ok(());
        }
        for ch in text.chars() {
            match ch {
                '\x1b' => self.0.push_str("\\x1b"),
                '\x07' => self.0.push_str("\\x07"),
                '\x08' => self.0.push_str("\\x08"),
                '\x0c' => self.0.push_str("\\x0c"),
                '\x7f' => self.0.push_str("\\x7f"),
                ch if (0x80..=0x9f).contains(&(ch as u32)) => {
                    write!(self.0, "\\u{{{:x}}}", ch as u32)?
                }
                ch => self.0.push(ch),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Every kind of field and foreign text a line can carry.
    fn events() {
        let hostile = "https://x\" decision=\"allowed\" \\ \n\r\u{1b}[31mred\u{202e}\u{85}é\t";
        let audience = "https://hot-service-abc123-uc.a.run.app";
        tracing::info!(
            target: "token_broker::audit::served",
            peer_uid = 1000u32,
            peer_gid = Some(100u32),
            peer_pid = Some(-5i32),
            peer_exe = None::<&str>,
            identity = "default",
            audience,
            decision = "allowed",
            latency_us = 271u64,
            expire_time = Some(1_795_777_635i64),
            result = "OK",
            "{}",
            "GetIdToken"
        );
        tracing::warn!(audience = hostile, "{}", hostile);
        tracing::warn!(
            quote = "a\"b",
            backslash = "a\\b",
            tab = "a\tb",
            del = "a\x7fb",
            ""
        );
        tracing::error!(
            r#type = "x",
            ok = true,
            no = false,
            ratio = 0.5f64,
            whole = 1.0f64,
            big = u128::MAX,
            small = i128::MIN,
            min = i64::MIN,
            debug = ?Some("a\"b"),
            display = %"plain \u{1b} display",
            error = &io::Error::other("disk \u{1b} full") as &(dyn std::error::Error + 'static),
            "message with \u{1b}[2J and \u{9b} controls"
        );
        tracing::info!("a literal message");
        tracing::info!(message = "message as a field", after = 1u64);
        tracing::info!(message = 42u64);
        tracing::debug!(target: "other_crate::module", empty = "", "");
        tracing::info!(first = "no message at all", second = 2i64);
        tracing::info!(bytes = &b"ab\x00"[..], "t");
    }

    #[test]
    fn lines_match_the_default_formatter_byte_for_byte() {
        let ours = Captured::default();
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .event_format(TextFormat::default())
                    .with_writer(ours.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(theirs.clone()),
            );
        tracing::subscriber::with_default(subscriber, events);
        let ours = String::from_utf8(ours.0.lock().unwrap().clone()).unwrap();
        let theirs = String::from_utf8(theirs.0.lock().unwrap().clone()).unwrap();
        // The two layers read the clock separately: compare with the
        // timestamps masked (the dates are checked below), after checking
        // each line starts with one.
        let stamp = regex::Regex::new(r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ").unwrap();
        assert_eq!(stamp.find_iter(&ours).count(), 10, "{ours}");
        assert_eq!(
            stamp.replace_all(&ours, "<time> "),
            stamp.replace_all(&theirs, "<time> ")
        );
    }

    #[test]
    fn the_escaping_check_finds_every_byte_at_every_place() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .any(|&b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\')
        };
        for len in [1, 7, 8, 9, 16, 19] {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut text = vec![b'a'; len];
                    // Neighbours that stress borrows: the smallest and
                    // largest clean bytes.
                    if at > 0 {
                        text[at - 1] = b' ';
                    }
                    if at + 1 < len {
                        text[at + 1] = b'~';
                    }
                    text[at] = byte;
                    assert_eq!(
                        needs_escaping(&text),
                        naive(&text),
                        "{byte:#x} at {at} of {len}"
                    );
                }
            }
        }
        assert!(!needs_escaping(b""));
    }

    #[test]
    fn dates_agree_with_http_dates_across_centuries() {
        // Leap days, month ends, the 2100 non-leap year, 9999's last second.
        let mut samples = vec![
            0u64,
            951_782_400,
            951_868_799,
            4_107_542_399,
            253_402_300_799,
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x % 253_402_300_800);
        }
        for secs in samples {
            let ours = second_text(secs);
            let ours = std::str::from_utf8(&ours).unwrap();
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            // "Tue, 15 Nov 1994 08:12:31 GMT"
            let http = httpdate::fmt_http_date(time);
            let parts: Vec<&str> = http.split([' ', ':']).collect();
            let month = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ]
            .iter()
            .position(|m| *m == parts[2])
            .unwrap()
                + 1;
            let expected = format!(
                "{}-{month:02}-{}T{}:{}:{}.",
                parts[3], parts[1], parts[4], parts[5], parts[6]
            );
            assert_eq!(ours, expected, "{secs}");
        }
    }

    #[test]
    fn times_outside_four_digit_years_are_left_to_the_default_formatter() {
        let mut text = String::new();
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert!(!push_timestamp(&mut text, before));
        let after = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert!(!push_timestamp(&mut text, after));
        assert!(text.is_empty());
        let at = UNIX_EPOCH + Duration::from_micros(1_795_777_635_000_042);
        assert!(push_timestamp(&mut text, at));
        assert_eq!(text, "2026-11-27T11:07:15.000042Z ");
    }
}
