//! `kimi_k2`: the tool calls of Kimi-K2 / K2.5 (vLLM `kimi_k2_tool_parser.py`):
//!
//! ```text
//! <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>
//! ```
//!
//! The call id is the model's own (`functions.get_weather:0`), the name is the id
//! without the `functions.` prefix and the `:N` suffix, and the arguments are the
//! model's JSON text, passed through with surrounding whitespace removed and
//! streamed as it arrives. The singular `<|tool_call_section_begin|>` spelling is
//! accepted too. Text after the section is content.

use super::emit::Emitter;
use super::scan::{consume, lead, leading_ws, skip_stray, text_step, value_step, Lead, Text, ValueEnd};
use super::{Format, Step};

const SECTION_OPEN: [&str; 2] = ["<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"];
const SECTION_CLOSE: [&str; 2] = ["<|tool_calls_section_end|>", "<|tool_call_section_end|>"];
const CALL_OPEN: &str = "<|tool_call_begin|>";
const ARGS_OPEN: &str = "<|tool_call_argument_begin|>";
const CALL_CLOSE: &str = "<|tool_call_end|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text {
        after_call: bool,
    },
    /// Inside the section, between calls.
    InSection,
    /// `<|tool_call_begin|>` consumed, reading the id.
    Id,
    /// Reading the arguments.
    Args,
}

/// The Kimi-K2 state machine.
#[derive(Debug)]
pub(crate) struct KimiK2 {
    state: State,
}

impl KimiK2 {
    pub(crate) fn new() -> Self {
        Self { state: State::Text { after_call: false } }
    }
}

/// The function name in an id such as `functions.get_weather:0`.
fn name_of(id: &str) -> &str {
    let base = match id.rsplit_once(':') {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b,
        _ => id,
    };
    base.strip_prefix("functions.").unwrap_or(base)
}

impl Format for KimiK2 {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step {
        match self.state {
            State::Text { after_call } => match text_step(buf, after_call, &SECTION_OPEN, at_end, em) {
                Text::Stay(after_call, step) => {
                    self.state = State::Text { after_call };
                    step
                }
                Text::Opened(_) => {
                    self.state = State::InSection;
                    Step::Progress
                }
            },
            State::InSection => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[CALL_OPEN, SECTION_CLOSE[0], SECTION_CLOSE[1]]) {
                    Lead::Full(0) => {
                        consume(buf, ws + CALL_OPEN.len());
                        self.state = State::Id;
                        Step::Progress
                    }
                    Lead::Full(m) => {
                        consume(buf, ws + SECTION_CLOSE[m - 1].len());
                        self.state = State::Text { after_call: true };
                        Step::Progress
                    }
                    Lead::Partial if !at_end => {
                        consume(buf, ws);
                        Step::Wait
                    }
                    _ if t.is_empty() => {
                        buf.clear();
                        self.state = State::Text { after_call: true };
                        Step::Wait
                    }
                    _ => {
                        skip_stray(buf, ws);
                        Step::Progress
                    }
                }
            }
            State::Id => {
                let Some(i) = buf.find(ARGS_OPEN) else {
                    if !at_end {
                        return Step::Wait;
                    }
                    // An id with no arguments marker: a call without arguments.
                    let id = buf.trim().to_string();
                    buf.clear();
                    if !id.is_empty() {
                        em.start_call(name_of(&id), Some(id.clone()), true);
                        em.end_call();
                    }
                    self.state = State::Text { after_call: true };
                    return Step::Progress;
                };
                let id = buf[..i].trim().to_string();
                consume(buf, i + ARGS_OPEN.len());
                em.start_call(name_of(&id), Some(id.clone()), true);
                self.state = State::Args;
                Step::Progress
            }
            State::Args => match value_step(buf, CALL_CLOSE, at_end, em) {
                ValueEnd::Closed => {
                    em.end_call();
                    self.state = State::InSection;
                    Step::Progress
                }
                ValueEnd::Ended => {
                    self.state = State::Text { after_call: true };
                    Step::Progress
                }
                ValueEnd::Wait => Step::Wait,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::name_of("functions.get_weather:0"), "get_weather");
        assert_eq!(super::name_of("get_weather:12"), "get_weather");
        assert_eq!(super::name_of("functions.a.b"), "a.b");
    }
}
