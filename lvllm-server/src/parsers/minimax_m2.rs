//! `minimax_m2`: the tool calls of MiniMax-M2/M2.1/M2.5 (vLLM
//! `minimax_m2_tool_parser.py`):
//!
//! ```text
//! <minimax:tool_call>
//! <invoke name="get_weather">
//! <parameter name="city">Paris</parameter>
//! </invoke>
//! </minimax:tool_call>
//! ```
//!
//! One block may hold several `<invoke>`s. Names may be quoted with `"` or `'` or
//! bare. Values are stripped of surrounding whitespace and typed by the schema;
//! an undeclared parameter stays a string. Unlike vLLM, a string-typed value of
//! `null` stays the string `"null"` (vLLM maps it to JSON null before typing).

use super::emit::{Emitter, Trim, TrimRules};
use super::scan::{consume, lead, leading_ws, skip_stray, text_step, value_step, Lead, Text, ValueEnd};
use super::{Format, Step};

const BLOCK_OPEN: &str = "<minimax:tool_call>";
const BLOCK_CLOSE: &str = "</minimax:tool_call>";
const INVOKE_OPEN: &str = "<invoke";
const INVOKE_CLOSE: &str = "</invoke>";
const PARAM_OPEN: &str = "<parameter";
const PARAM_CLOSE: &str = "</parameter>";

const RULES: TrimRules = TrimRules { string: (Trim::All, Trim::All), other: (Trim::All, Trim::All) };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text {
        after_call: bool,
    },
    /// Inside `<minimax:tool_call>`, between invokes.
    InBlock,
    /// Inside `<invoke …>`, between parameters.
    InInvoke,
    /// Inside a parameter value.
    InValue,
}

/// The MiniMax-M2 state machine.
#[derive(Debug)]
pub(crate) struct MinimaxM2 {
    state: State,
}

impl MinimaxM2 {
    pub(crate) fn new() -> Self {
        Self { state: State::Text { after_call: false } }
    }
}

/// The name in an attribute list such as ` name="get_weather"`.
fn attr_name(attrs: &str) -> String {
    let a = attrs.trim();
    let a = a.strip_prefix("name").map(str::trim_start).and_then(|a| a.strip_prefix('=')).unwrap_or(a).trim();
    let unquoted = [('"', '"'), ('\'', '\'')]
        .iter()
        .find_map(|&(o, c)| a.strip_prefix(o).and_then(|x| x.strip_suffix(c)))
        .unwrap_or(a);
    unquoted.to_string()
}

impl Format for MinimaxM2 {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step {
        match self.state {
            State::Text { after_call } => match text_step(buf, after_call, &[BLOCK_OPEN], at_end, em) {
                Text::Stay(after_call, step) => {
                    self.state = State::Text { after_call };
                    step
                }
                Text::Opened(_) => {
                    self.state = State::InBlock;
                    Step::Progress
                }
            },
            State::InBlock => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[INVOKE_OPEN, BLOCK_CLOSE]) {
                    Lead::Full(0) => match t.find('>') {
                        Some(j) => {
                            let name = attr_name(&t[INVOKE_OPEN.len()..j]);
                            consume(buf, ws + j + 1);
                            em.start_call(&name, None, false);
                            self.state = State::InInvoke;
                            Step::Progress
                        }
                        None if at_end => {
                            buf.clear();
                            Step::Progress
                        }
                        None => Step::Wait,
                    },
                    Lead::Full(_) => {
                        consume(buf, ws + BLOCK_CLOSE.len());
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
            State::InInvoke => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[PARAM_OPEN, INVOKE_CLOSE, BLOCK_CLOSE]) {
                    Lead::Full(0) => match t.find('>') {
                        Some(j) => {
                            let name = attr_name(&t[PARAM_OPEN.len()..j]);
                            consume(buf, ws + j + 1);
                            em.start_param(&name, RULES);
                            self.state = State::InValue;
                            Step::Progress
                        }
                        None if at_end => {
                            buf.clear();
                            em.end_call();
                            Step::Progress
                        }
                        None => Step::Wait,
                    },
                    Lead::Full(1) => {
                        consume(buf, ws + INVOKE_CLOSE.len());
                        em.end_call();
                        self.state = State::InBlock;
                        Step::Progress
                    }
                    Lead::Full(_) => {
                        consume(buf, ws + BLOCK_CLOSE.len());
                        em.end_call();
                        self.state = State::Text { after_call: true };
                        Step::Progress
                    }
                    Lead::Partial if !at_end => {
                        consume(buf, ws);
                        Step::Wait
                    }
                    _ if t.is_empty() => {
                        buf.clear();
                        em.end_call();
                        self.state = State::Text { after_call: true };
                        Step::Wait
                    }
                    _ => {
                        skip_stray(buf, ws);
                        Step::Progress
                    }
                }
            }
            State::InValue => match value_step(buf, PARAM_CLOSE, at_end, em) {
                ValueEnd::Closed => {
                    em.end_param();
                    self.state = State::InInvoke;
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
    fn attr_names() {
        assert_eq!(super::attr_name(" name=\"get_weather\""), "get_weather");
        assert_eq!(super::attr_name(" name='x'"), "x");
        assert_eq!(super::attr_name(" name=bare"), "bare");
    }
}
