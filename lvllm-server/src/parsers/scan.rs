//! Text-scanning helpers shared by the streaming parsers: how much of a buffer's
//! tail must be held back because it could still become a marker, and how the
//! start of a buffer compares with a set of expected markers.
//!
//! [`text_step`] is the text state of every tool-call format.
//!
//! Every marker used by the parsers is ASCII, so a suffix of the buffer that
//! equals a prefix of a marker always starts on a `char` boundary.

use super::emit::Emitter;
use super::Step;

/// Length in bytes of the longest suffix of `text` that is a proper prefix of
/// `marker` (the part that must be held back until the next delta decides).
pub(crate) fn partial_suffix_len(text: &str, marker: &str) -> usize {
    let t = text.as_bytes();
    let m = marker.as_bytes();
    let max = m.len().saturating_sub(1).min(t.len());
    (1..=max).rev().find(|&k| t[t.len() - k..] == m[..k]).unwrap_or(0)
}

/// [`partial_suffix_len`] over several markers: the longest hold-back needed.
pub(crate) fn hold_len(text: &str, markers: &[&str]) -> usize {
    markers.iter().map(|m| partial_suffix_len(text, m)).max().unwrap_or(0)
}

/// The earliest occurrence of any of `markers` in `text`: (byte offset, marker index).
pub(crate) fn find_first(text: &str, markers: &[&str]) -> Option<(usize, usize)> {
    markers.iter().enumerate().filter_map(|(i, m)| text.find(m).map(|pos| (pos, i))).min()
}

/// How the start of a buffer compares with a set of expected markers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lead {
    /// The buffer starts with marker number `.0`.
    Full(usize),
    /// The buffer is (so far) a proper prefix of at least one marker: wait.
    Partial,
    /// The buffer cannot start with any marker.
    None,
}

/// Compares the start of `text` with `markers` (see [`Lead`]).
pub(crate) fn lead(text: &str, markers: &[&str]) -> Lead {
    if let Some(i) = markers.iter().position(|m| text.starts_with(m)) {
        return Lead::Full(i);
    }
    if markers.iter().any(|m| m.starts_with(text)) {
        return Lead::Partial;
    }
    Lead::None
}

/// What [`text_step`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Text {
    /// Still in text, with the new "just after a call" flag and the step's result.
    Stay(bool, Step),
    /// Content up to marker `opens[.0]` was emitted and the marker consumed.
    Opened(usize),
}

/// The text state every tool-call format shares: right after a call, drop the
/// whitespace that separates calls; otherwise emit content up to the first of
/// `opens`, holding back a tail that may still become one (unless `at_end`).
pub(crate) fn text_step(buf: &mut String, after_call: bool, opens: &[&str], at_end: bool, em: &mut Emitter) -> Text {
    if after_call {
        consume(buf, leading_ws(buf));
        return if buf.is_empty() { Text::Stay(true, Step::Wait) } else { Text::Stay(false, Step::Progress) };
    }
    if let Some((i, m)) = find_first(buf, opens) {
        em.content(&buf[..i]);
        consume(buf, i + opens[m].len());
        return Text::Opened(m);
    }
    let keep = if at_end { 0 } else { hold_len(buf, opens) };
    let n = buf.len() - keep;
    if n == 0 {
        return Text::Stay(false, Step::Wait);
    }
    em.content(&buf[..n]);
    consume(buf, n);
    Text::Stay(false, Step::Progress)
}

/// What [`value_step`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ValueEnd {
    /// `close` was found and consumed: the value is complete.
    Closed,
    /// The output ended inside the value: the call was closed.
    Ended,
    /// More text is needed.
    Wait,
}

/// The value state every tool-call format shares: stream value text up to
/// `close` (holding back a tail that may still become it); at the end of the
/// output an unterminated value ends its call.
pub(crate) fn value_step(buf: &mut String, close: &str, at_end: bool, em: &mut Emitter) -> ValueEnd {
    if let Some(i) = buf.find(close) {
        em.value_text(&buf[..i]);
        consume(buf, i + close.len());
        return ValueEnd::Closed;
    }
    let keep = if at_end { 0 } else { hold_len(buf, &[close]) };
    let n = buf.len() - keep;
    if n > 0 {
        em.value_text(&buf[..n]);
        consume(buf, n);
    }
    if at_end {
        em.end_call();
        return ValueEnd::Ended;
    }
    ValueEnd::Wait
}

/// Removes the first `n` bytes of `buf`.
pub(crate) fn consume(buf: &mut String, n: usize) {
    buf.drain(..n);
}

/// Byte length of the leading whitespace of `text`.
pub(crate) fn leading_ws(text: &str) -> usize {
    text.len() - text.trim_start().len()
}

/// Drops stray text inside a call (after `ws` bytes of whitespace): everything up
/// to the next `<` after its first character, or the whole buffer.
pub(crate) fn skip_stray(buf: &mut String, ws: usize) {
    let t = &buf[ws..];
    let first = t.chars().next().map_or(0, char::len_utf8);
    let skip = t[first..].find('<').map_or(buf.len(), |j| ws + first + j);
    consume(buf, skip);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_suffix() {
        assert_eq!(partial_suffix_len("abc<tool_c", "<tool_call>"), 7);
        assert_eq!(partial_suffix_len("abc<", "<tool_call>"), 1);
        assert_eq!(partial_suffix_len("abc", "<tool_call>"), 0);
        // A complete marker is not a partial one.
        assert_eq!(partial_suffix_len("<a>", "<a>"), 0);
        assert_eq!(partial_suffix_len("日本<", "<a>"), 1);
        assert_eq!(hold_len("x</thi", &["</think>", "<tool_call>"]), 5);
    }

    #[test]
    fn lead_and_find() {
        assert_eq!(lead("<para", &["<parameter=", "</function>"]), Lead::Partial);
        assert_eq!(lead("", &["<a>"]), Lead::Partial);
        assert_eq!(lead("</function>x", &["<parameter=", "</function>"]), Lead::Full(1));
        assert_eq!(lead("hello", &["<a>"]), Lead::None);
        assert_eq!(find_first("xx<b>yy<a>", &["<a>", "<b>"]), Some((2, 1)));
        assert_eq!(find_first("xx", &["<a>"]), None);
    }
}
