//! `hermes`: the JSON tool calls of Qwen3 / Qwen3-MoE, Qwen2.5 and Hermes models
//! (vLLM `hermes_tool_parser.py`), the format the Qwen3 chat template renders:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! A call's JSON is held until its `</tool_call>` (or the end of the output),
//! then emitted as the call's start and its whole arguments string (compact
//! JSON; arguments written as a JSON string are accepted too). A block whose
//! JSON is not an object with a string `name` and object `arguments` stays
//! content, markers included. Text around the calls is content.

use super::emit::Emitter;
use super::scan::{consume, text_step, Text};
use super::{Format, Step};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Text { after_call: bool },
    Call,
}

/// The hermes state machine.
#[derive(Debug)]
pub(crate) struct Hermes {
    state: State,
}

impl Hermes {
    pub(crate) fn new() -> Self {
        Self { state: State::Text { after_call: false } }
    }
}

/// Emits the call in `json`, or the block as content when it is not a call;
/// returns whether it was a call.
fn emit_block(json: &str, em: &mut Emitter, closed: bool) -> bool {
    let call = serde_json::from_str::<serde_json::Value>(json.trim()).ok().and_then(|v| {
        let name = v.get("name")?.as_str()?.to_string();
        let args = match v.get("arguments").or_else(|| v.get("parameters")) {
            None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
            // Some models write the arguments as a JSON string.
            Some(serde_json::Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) => a.clone(),
        };
        args.is_object().then(|| (name, args.to_string()))
    });
    match call {
        Some((name, args)) => {
            em.start_call(&name, None, true);
            em.raw_args(&args);
            em.end_call();
            true
        }
        None => {
            em.content(&format!("{OPEN}{json}{}", if closed { CLOSE } else { "" }));
            false
        }
    }
}

impl Format for Hermes {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step {
        match self.state {
            State::Text { after_call } => match text_step(buf, after_call, &[OPEN], at_end, em) {
                Text::Stay(after_call, step) => {
                    self.state = State::Text { after_call };
                    step
                }
                Text::Opened(_) => {
                    self.state = State::Call;
                    Step::Progress
                }
            },
            State::Call => {
                if let Some(i) = buf.find(CLOSE) {
                    let json = buf[..i].to_string();
                    consume(buf, i + CLOSE.len());
                    let after_call = emit_block(&json, em, true);
                    self.state = State::Text { after_call };
                    return Step::Progress;
                }
                if !at_end {
                    return Step::Wait;
                }
                // Cut off before `</tool_call>`: a complete JSON call still counts.
                let json = std::mem::take(buf);
                let after_call = emit_block(&json, em, false);
                self.state = State::Text { after_call };
                Step::Progress
            }
        }
    }
}
