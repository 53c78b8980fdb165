//! Text the broker did not write (a client's audience or identity, a path,
//! an executable name, an upstream's error body) made safe to put in a log
//! line or an error answer.
//!
//! [`LogText`] keeps at most [`MAX_LOGGED_BYTES`] of the text, marking the
//! cut, and displays it quoted with every quote, backslash, control
//! character (newlines, ANSI escapes) and invisible or bidirectional Unicode
//! character escaped. Whatever the text holds, it stays one field of one
//! line and cannot recolour or rewrite a terminal.
//!
//! In a `tracing` event, pass it as a string field (`audience =
//! text.as_str()`): the text formatter writes string fields with the same
//! quoting and escaping as [`LogText`]'s `Display`, and the JSON formatter
//! writes them as JSON strings. Never pass foreign text with `%`, which
//! writes it raw in text format.

use std::{borrow::Cow, fmt};

/// Most bytes of foreign text kept in one field.
pub const MAX_LOGGED_BYTES: usize = 256;

/// Foreign text, capped; `Display` and `Debug` quote and escape it.
#[derive(Clone, PartialEq, Eq)]
pub struct LogText(String);

impl LogText {
    /// Keeps the first [`MAX_LOGGED_BYTES`] of `text` (at a character
    /// boundary) and says how many bytes were cut.
    pub fn new(text: &str) -> Self {
        if text.len() <= MAX_LOGGED_BYTES {
            return Self(text.to_owned());
        }
        let mut end = MAX_LOGGED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self(format!(
            "{}…[{} more bytes cut]",
            &text[..end],
            text.len() - end
        ))
    }

    /// The capped text, unescaped: for a `tracing` string field, which the
    /// formatters quote and escape themselves.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What [`LogText::new`] keeps of `text`, as a string field, borrowed
    /// when nothing is cut (nearly always): the request path logs without
    /// copying.
    pub fn capped(text: &str) -> Cow<'_, str> {
        if text.len() <= MAX_LOGGED_BYTES {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(Self::new(text).0)
        }
    }
}

impl From<&str> for LogText {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl fmt::Display for LogText {
    /// Rust's string escaping: `"` and `\` escaped, and every character that
    /// is not printable (controls, ESC, U+202E and other format characters)
    /// written as `\n`, `\u{1b}` and the like, all inside quotes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Debug for LogText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_escapes_what_could_forge_a_field_or_a_line() {
        let forged = "https://x\" decision=\"allowed\" peer_uid=0 \\ \n2026-01-01 INFO fake\r\u{1b}[31mred\u{202e}";
        let shown = LogText::new(forged).to_string();
        assert_eq!(
            shown,
            r#""https://x\" decision=\"allowed\" peer_uid=0 \\ \n2026-01-01 INFO fake\r\u{1b}[31mred\u{202e}""#
        );
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}'));
        // Only the opening and closing quotes are unescaped.
        let unescaped_quotes = shown
            .char_indices()
            .filter(|&(i, c)| c == '"' && (i == 0 || !shown[..i].ends_with('\\')))
            .count();
        assert_eq!(unescaped_quotes, 2, "{shown}");
        assert_eq!(format!("{:?}", LogText::new("a b")), "\"a b\"");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_marked() {
        assert_eq!(LogText::new(&"a".repeat(256)).as_str(), "a".repeat(256));
        let cut = LogText::new(&"a".repeat(16 * 1024));
        assert_eq!(
            cut.as_str(),
            format!("{}…[{} more bytes cut]", "a".repeat(256), 16 * 1024 - 256)
        );
        // 'é' is two bytes: 255 'a's then an 'é' straddling byte 256.
        let text = format!("{}é{}", "a".repeat(255), "b".repeat(10));
        let cut = LogText::new(&text);
        assert!(cut.as_str().starts_with(&"a".repeat(255)));
        assert!(cut.as_str().ends_with("…[12 more bytes cut]"), "{cut}");
        for text in ["", "short", &"a".repeat(256), &"a".repeat(257), &text] {
            assert_eq!(LogText::capped(text), LogText::new(text).as_str());
        }
        assert!(matches!(
            LogText::capped(&"a".repeat(256)),
            Cow::Borrowed(_)
        ));
    }
}
