//! Showing text that came from input (tensor names, case file names, op strings, module and
//! config names, paths) in messages: the one place that decides how.
//!
//! [`escape`] shows every control character (and the invisible Unicode characters that
//! reorder or hide text) as an escape (`\n`, `\u{1b}`) instead of sending it, so a name can
//! neither start a new line (and forge a `PASS` or `error:` line) nor drive the terminal; and
//! it shortens a name longer than [`MAX_SHOWN_CHARS`] characters to its first
//! [`MAX_SHOWN_CHARS`] characters, an ellipsis and the original length. [`escape_path`] does
//! the same for paths, with the longer limit [`MAX_SHOWN_PATH_CHARS`]; [`escape_list`] shows
//! a list of names (each through [`escape`], at most [`MAX_SHOWN_ITEMS`] of them).
//!
//! ```
//! use qfuse::io::text::escape;
//! assert_eq!(escape("conv1.weight"), "conv1.weight");
//! assert_eq!(escape("a\nPASS b"), "a\\nPASS b");
//! assert_eq!(escape("\u{1b}[2J"), "\\u{1b}[2J");
//! let long = "x".repeat(100_000);
//! assert!(escape(&long).ends_with("… (100000 characters)"));
//! ```

use std::fmt::Write;
use std::path::Path;

/// Names longer than this many characters are shown shortened.
pub const MAX_SHOWN_CHARS: usize = 120;

/// Paths longer than this many characters are shown shortened.
pub const MAX_SHOWN_PATH_CHARS: usize = 1024;

/// Lists of names longer than this are shown shortened ([`escape_list`]).
pub const MAX_SHOWN_ITEMS: usize = 16;

/// Characters that are not sent as they are: C0/C1 controls and DEL, and the format
/// characters that hide or reorder text (zero-width, bidirectional overrides and isolates,
/// line and paragraph separators, the byte-order mark).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

fn escape_limited(s: &str, limit: usize) -> String {
    let mut out = String::with_capacity(s.len().min(limit * 2));
    let mut chars = s.chars();
    for (count, c) in chars.by_ref().enumerate() {
        if count == limit {
            // Count the rest without copying it.
            let total = limit + 1 + chars.count();
            let _ = write!(out, "… ({total} characters)");
            return out;
        }
        push_escaped(&mut out, c);
    }
    out
}

/// `s` as it may be shown in a message: control and invisible formatting characters
/// escaped, and shortened past [`MAX_SHOWN_CHARS`] characters (`…` and the original length
/// in characters follow the kept prefix). Text without such characters and short enough is
/// returned unchanged.
pub fn escape(s: &str) -> String {
    escape_limited(s, MAX_SHOWN_CHARS)
}

/// A path as it may be shown in a message: [`escape`] with the limit
/// [`MAX_SHOWN_PATH_CHARS`] (bytes that are not UTF-8 are shown as `�`).
pub fn escape_path(path: &Path) -> String {
    escape_limited(&path.to_string_lossy(), MAX_SHOWN_PATH_CHARS)
}

/// A list of names from input as it may be shown in a message, in place of its `{:?}` form:
/// `["a", "b"]`, each name through [`escape`] (escaped, shortened past [`MAX_SHOWN_CHARS`]);
/// past [`MAX_SHOWN_ITEMS`] names, the first [`MAX_SHOWN_ITEMS`] and the count.
///
/// ```
/// use qfuse::io::text::escape_list;
/// assert_eq!(escape_list(&["conv1", "a\nPASS"]), r#"["conv1", "a\nPASS"]"#);
/// let many: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
/// assert!(escape_list(&many).ends_with(r#""m15", … (100 names)]"#));
/// ```
pub fn escape_list<S: AsRef<str>>(items: &[S]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        if i == MAX_SHOWN_ITEMS {
            let _ = write!(out, "… ({} names)", items.len());
            break;
        }
        let _ = write!(out, "\"{}\"", escape(item.as_ref()));
    }
    out.push(']');
    out
}

/// [`escape_path`] for a path already held as a string (the `path` fields of
/// [`crate::Error`]).
pub fn escape_path_str(path: &str) -> String {
    escape_limited(path, MAX_SHOWN_PATH_CHARS)
}

/// The last line of defence for a whole message about to be printed (the command line's
/// `error:` line): every control or invisible formatting character escaped, except a line
/// break followed by a tab, the layout of PyTorch's multi-line `load_state_dict` message
/// (names inside it are escaped where the message is built). No shortening.
pub fn escape_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' && chars.peek() == Some(&'\t') {
            chars.next();
            out.push_str("\n\t");
        } else {
            push_escaped(&mut out, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_escaped_and_shortened() {
        let empty: [&str; 0] = [];
        assert_eq!(escape_list(&empty), "[]");
        assert_eq!(
            escape_list(&["a\nerror: forged", "\u{1b}[2J"]),
            r#"["a\nerror: forged", "\u{1b}[2J"]"#
        );
        let long = "y".repeat(100_000);
        let shown = escape_list(&[long.as_str()]);
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.ends_with("… (100000 characters)\"]"), "{shown}");
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        let shown = escape_list(&many);
        assert!(shown.starts_with(r#"["0", "1", "#), "{shown}");
        assert!(shown.ends_with(r#""15", … (17 names)]"#), "{shown}");
        assert_eq!(escape_list(&many[..16]).matches('"').count(), 32);
    }

    #[test]
    fn plain_names_are_unchanged() {
        for s in ["conv1.weight", "layer1.0.bn1", "in.x", "π·σ", ""] {
            assert_eq!(escape(s), s);
        }
    }

    #[test]
    fn controls_are_shown_not_sent() {
        assert_eq!(escape("a\nPASS x"), "a\\nPASS x");
        assert_eq!(escape("a\r\tb"), "a\\r\\tb");
        assert_eq!(escape("\u{1b}[2J\u{7}"), "\\u{1b}[2J\\u{7}");
        assert_eq!(
            escape("\u{85}\u{202e}x\u{2028}"),
            "\\u{85}\\u{202e}x\\u{2028}"
        );
        assert!(!escape("\u{0}\u{1f}\u{7f}\u{9b}")
            .chars()
            .any(char::is_control));
    }

    #[test]
    fn long_names_are_shortened_with_their_length() {
        let s = "é".repeat(100_000);
        let e = escape(&s);
        assert_eq!(e, format!("{}… (100000 characters)", "é".repeat(120)));
        assert_eq!(escape(&"a".repeat(120)), "a".repeat(120));
        assert_eq!(
            escape(&"a".repeat(121)),
            format!("{}… (121 characters)", "a".repeat(120))
        );
        let p = "d/".repeat(600);
        assert!(escape_path(Path::new(&p)).ends_with("… (1200 characters)"));
    }

    #[test]
    fn messages_keep_only_the_tab_indented_breaks() {
        assert_eq!(
            escape_message("Error(s):\n\tMissing key(s)\nPASS\u{1b}"),
            "Error(s):\n\tMissing key(s)\\nPASS\\u{1b}"
        );
    }
}
