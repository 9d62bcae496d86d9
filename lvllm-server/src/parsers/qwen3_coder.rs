//! `qwen3_coder`: the XML-style tool calls of Qwen3-Coder and Qwen3-Next/3.5
//! (vLLM `qwen3coder_tool_parser.py`):
//!
//! ```text
//! <tool_call>
//! <function=get_weather>
//! <parameter=city>
//! Paris
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! One `\n` is removed at each end of a parameter value; values are typed by the
//! tool schema, an undeclared parameter stays a string. A `<tool_call>` not
//! followed by `<function=NAME>` (NAME without spaces, quotes, braces or `<>`)
//! stays content. An unterminated call at the end of the output is closed there
//! (generation hit its token limit), as vLLM's non-streaming parser does.

use super::emit::{Emitter, Trim, TrimRules};
use super::scan::{consume, lead, leading_ws, skip_stray, text_step, value_step, Lead, Text, ValueEnd};
use super::{Format, Step};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const FUNC_OPEN: &str = "<function=";
const FUNC_CLOSE: &str = "</function>";
const PARAM_OPEN: &str = "<parameter=";
const PARAM_CLOSE: &str = "</parameter>";

const RULES: TrimRules =
    TrimRules { string: (Trim::OneNewline, Trim::OneNewline), other: (Trim::OneNewline, Trim::OneNewline) };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside calls; `after_call` drops whitespace right after a call.
    Text { after_call: bool },
    /// `<tool_call>` consumed, expecting `<function=NAME>`.
    AfterOpen,
    /// Inside `<function=…>`, between parameters.
    InCall,
    /// Inside a parameter value.
    InParam,
    /// `</function>` consumed, expecting `</tool_call>`.
    AfterFunction,
}

/// The `qwen3_coder` state machine.
#[derive(Debug)]
pub(crate) struct Qwen3Coder {
    state: State,
}

impl Qwen3Coder {
    pub(crate) fn new() -> Self {
        Self { state: State::Text { after_call: false } }
    }
}

/// A function or parameter name as vLLM accepts it.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| "{}<>\"' \t\n\r".contains(c))
}

impl Format for Qwen3Coder {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step {
        match self.state {
            State::Text { after_call } => match text_step(buf, after_call, &[CALL_OPEN], at_end, em) {
                Text::Stay(after_call, step) => {
                    self.state = State::Text { after_call };
                    step
                }
                Text::Opened(_) => {
                    self.state = State::AfterOpen;
                    Step::Progress
                }
            },
            State::AfterOpen => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                let malformed = match lead(t, &[FUNC_OPEN]) {
                    Lead::Full(_) => match t[FUNC_OPEN.len()..].find(['>', '\n', '<']) {
                        Some(j) if t.as_bytes()[FUNC_OPEN.len() + j] == b'>' => {
                            let name = &t[FUNC_OPEN.len()..FUNC_OPEN.len() + j];
                            if valid_name(name) {
                                let name = name.to_string();
                                consume(buf, ws + FUNC_OPEN.len() + j + 1);
                                em.start_call(&name, None, false);
                                self.state = State::InCall;
                                return Step::Progress;
                            }
                            true
                        }
                        Some(_) => true,
                        None if at_end => true,
                        None => return Step::Wait,
                    },
                    Lead::Partial if !at_end => return Step::Wait,
                    _ => true,
                };
                debug_assert!(malformed);
                // Not a call: the `<tool_call>` marker was plain text.
                em.content(CALL_OPEN);
                self.state = State::Text { after_call: false };
                Step::Progress
            }
            State::InCall => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[PARAM_OPEN, FUNC_CLOSE, CALL_CLOSE]) {
                    Lead::Full(0) => match t[PARAM_OPEN.len()..].find('>') {
                        Some(j) => {
                            let name = t[PARAM_OPEN.len()..PARAM_OPEN.len() + j].to_string();
                            consume(buf, ws + PARAM_OPEN.len() + j + 1);
                            em.start_param(&name, RULES);
                            self.state = State::InParam;
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
                        consume(buf, ws + FUNC_CLOSE.len());
                        self.state = State::AfterFunction;
                        Step::Progress
                    }
                    Lead::Full(_) => {
                        consume(buf, ws + CALL_CLOSE.len());
                        em.end_call();
                        self.state = State::Text { after_call: true };
                        Step::Progress
                    }
                    Lead::Partial if !at_end => {
                        consume(buf, ws);
                        Step::Wait
                    }
                    _ if at_end && t.is_empty() => {
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
            State::InParam => match value_step(buf, PARAM_CLOSE, at_end, em) {
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
            State::AfterFunction => {
                let ws = leading_ws(buf);
                let t = &buf[ws..];
                match lead(t, &[CALL_CLOSE]) {
                    Lead::Full(_) => {
                        consume(buf, ws + CALL_CLOSE.len());
                    }
                    Lead::Partial if !at_end => return Step::Wait,
                    _ => {}
                }
                em.end_call();
                self.state = State::Text { after_call: true };
                Step::Progress
            }
        }
    }
}
