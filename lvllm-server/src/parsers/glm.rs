//! `glm45` / `glm47`: the tool calls of GLM-4.5/4.6 and GLM-4.7 (vLLM
//! `glm4_moe_tool_parser.py`, `glm47_moe_tool_parser.py`):
//!
//! ```text
//! <tool_call>get_weather
//! <arg_key>city</arg_key>
//! <arg_value>Paris</arg_value>
//! </tool_call>
//! ```
//!
//! GLM-4.7 writes no newline after the name (`<tool_call>get_weather<arg_key>…`)
//! and may write zero-argument calls (`<tool_call>f</tool_call>`). One parser
//! reads both: the name ends at the first whitespace or `<`, as in vLLM's
//! `glm47` regex. String-typed values are kept verbatim; other values are
//! stripped and parsed (JSON, then the Python literals), as vLLM does. A
//! `<tool_call>` with no name stays content.

use super::emit::{Emitter, Trim, TrimRules};
use super::scan::{consume, lead, leading_ws, skip_stray, text_step, value_step, Lead, Text, ValueEnd};
use super::{Format, Step};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const KEY_OPEN: &str = "<arg_key>";
const KEY_CLOSE: &str = "</arg_key>";
const VALUE_OPEN: &str = "<arg_value>";
const VALUE_CLOSE: &str = "</arg_value>";

const RULES: TrimRules = TrimRules { string: (Trim::None, Trim::None), other: (Trim::All, Trim::All) };

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Text {
        after_call: bool,
    },
    /// `<tool_call>` consumed, reading the function name.
    Name,
    /// Between arguments.
    InCall,
    /// `<arg_key>K</arg_key>` read, expecting `<arg_value>`.
    AfterKey(String),
    /// Inside `<arg_value>`.
    InValue,
}

/// The GLM state machine.
#[derive(Debug)]
pub(crate) struct Glm {
    state: State,
}

impl Glm {
    pub(crate) fn new() -> Self {
        Self { state: State::Text { after_call: false } }
    }
}

impl Format for Glm {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step {
        match &self.state {
            State::Text { after_call } => match text_step(buf, *after_call, &[CALL_OPEN], at_end, em) {
                Text::Stay(after_call, step) => {
                    self.state = State::Text { after_call };
                    step
                }
                Text::Opened(_) => {
                    self.state = State::Name;
                    Step::Progress
                }
            },
            State::Name => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                let end = t.find(|c: char| c.is_whitespace() || c == '<');
                let name_len = match end {
                    Some(j) => j,
                    None if at_end => t.len(),
                    None => return Step::Wait,
                };
                if name_len == 0 {
                    // `<tool_call>` without a name: plain text.
                    em.content(CALL_OPEN);
                    self.state = State::Text { after_call: false };
                    return Step::Progress;
                }
                let name = t[..name_len].to_string();
                consume(buf, ws + name_len);
                em.start_call(&name, None, false);
                self.state = State::InCall;
                Step::Progress
            }
            State::InCall => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[KEY_OPEN, CALL_CLOSE]) {
                    Lead::Full(0) => match t.find(KEY_CLOSE) {
                        Some(j) => {
                            let key = t[KEY_OPEN.len()..j].trim().to_string();
                            consume(buf, ws + j + KEY_CLOSE.len());
                            self.state = State::AfterKey(key);
                            Step::Progress
                        }
                        None if at_end => {
                            buf.clear();
                            self.close(em);
                            Step::Progress
                        }
                        None => Step::Wait,
                    },
                    Lead::Full(_) => {
                        consume(buf, ws + CALL_CLOSE.len());
                        self.close(em);
                        Step::Progress
                    }
                    Lead::Partial if !at_end => {
                        consume(buf, ws);
                        Step::Wait
                    }
                    _ if at_end && t.is_empty() => {
                        buf.clear();
                        self.close(em);
                        Step::Wait
                    }
                    _ => {
                        skip_stray(buf, ws);
                        Step::Progress
                    }
                }
            }
            State::AfterKey(key) => {
                let ws = leading_ws(buf);
                match lead(&buf[ws..], &[VALUE_OPEN]) {
                    Lead::Full(_) => {
                        let key = key.clone();
                        consume(buf, ws + VALUE_OPEN.len());
                        em.start_param(&key, RULES);
                        self.state = State::InValue;
                        Step::Progress
                    }
                    Lead::Partial if !at_end => Step::Wait,
                    // A key without a value is dropped.
                    _ => {
                        self.state = State::InCall;
                        Step::Progress
                    }
                }
            }
            State::InValue => match value_step(buf, VALUE_CLOSE, at_end, em) {
                ValueEnd::Closed => {
                    em.end_param();
                    self.state = State::InCall;
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

impl Glm {
    fn close(&mut self, em: &mut Emitter) {
        em.end_call();
        self.state = State::Text { after_call: true };
    }
}
