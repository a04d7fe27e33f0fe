//! Text that comes from a host (task messages, output tails, reason codes,
//! observed values, driver strings, identity fields): a compromised host
//! chooses every byte of it, so it is made harmless before it is stored or
//! printed. [`escape`] writes control characters (ANSI escapes, carriage
//! returns, backspaces, newlines) and the invisible Unicode direction
//! overrides as visible `\u{..}` text, so host text can never move the
//! cursor, clear a line or overwrite another row of the operator's screen;
//! [`bounded`] escapes and cuts to a byte limit before host text goes into
//! a host record, an event, a status snapshot or an evidence packet.
//!
//! Escaping is idempotent: escaped text has no control characters, so
//! escaping it again changes nothing (text stored escaped prints as is).

use std::borrow::Cow;

/// Longest single host field kept (a reason code, a version, an id), bytes.
pub const MAX_FIELD: usize = 256;
/// Longest host message kept (a task message, one failure text), bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Most output-tail lines kept from one task status.
pub const MAX_TAIL_LINES: usize = 20;

/// Whether `c` must not reach a terminal as is: C0/C1 controls and DEL,
/// and the zero-width and bidirectional formatting characters that make
/// text read differently from what it is.
fn hostile(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control or formatting character written as `\u{hex}`.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hostile) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hostile(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Text of several lines (a rendered table or report) escaped line by
/// line: its own line breaks stay, every other control character is
/// written visibly.
pub fn escape_lines(s: &str) -> String {
    s.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

/// `s` escaped and cut to at most `max` bytes (on a character boundary),
/// with a note of how much was cut.
pub fn bounded(s: &str, max: usize) -> String {
    let e = escape(s);
    if e.len() <= max {
        return e.into_owned();
    }
    let mut end = max;
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[{} bytes cut]", &e[..end], e.len() - end)
}

/// A host field (code, version, id): escaped, at most [`MAX_FIELD`] bytes.
pub fn field(s: &str) -> String {
    bounded(s, MAX_FIELD)
}

/// A host message: escaped, at most [`MAX_MESSAGE`] bytes.
pub fn message(s: &str) -> String {
    bounded(s, MAX_MESSAGE)
}

/// An output tail: its last [`MAX_TAIL_LINES`] lines, each a [`field`]-sized
/// escaped line (longer lines are cut).
pub fn tail(lines: &[String]) -> Vec<String> {
    let skip = lines.len().saturating_sub(MAX_TAIL_LINES);
    lines[skip..].iter().map(|l| bounded(l, 512)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn terminal_controls_are_written_visibly() {
        let s = "550.54.15\x1b[1A\x1b[2K\rgpu-2 HEALTHY\u{202e}";
        let e = escape(s);
        assert!(!e.chars().any(hostile), "{e}");
        assert_eq!(
            e,
            "550.54.15\\u{1b}[1A\\u{1b}[2K\\u{d}gpu-2 HEALTHY\\u{202e}"
        );
        // Idempotent, and plain text is borrowed untouched.
        assert_eq!(escape(&e), e);
        assert!(matches!(escape("550.54.15"), Cow::Borrowed(_)));
        assert_eq!(escape_lines("a\x1b[1A\nb\r\n"), "a\\u{1b}[1A\nb\\u{d}\n");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let s = "é".repeat(1000);
        let b = bounded(&s, 101);
        assert!(b.starts_with(&"é".repeat(50)));
        assert!(b.ends_with("…[1900 bytes cut]"), "{b}");
        assert_eq!(tail(&vec!["x".to_string(); 50]).len(), MAX_TAIL_LINES);
    }
}
