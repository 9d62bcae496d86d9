//! The event sink the tool-call formats write into: content, call starts, and the
//! arguments JSON built incrementally from (key, value) pairs or passed through raw.
//!
//! Arguments are written as Python's `json.dumps` writes a dict (`{"k": v, "k2": v2}`),
//! which is what vLLM returns. String-typed values are streamed as they arrive
//! (JSON-escaped chunk by chunk); other values are converted when complete.
//! Whitespace trimming of values is applied incrementally (trailing whitespace is
//! held back until a non-space character or the value's end decides), so any way
//! of splitting the input produces the same concatenated arguments.

use super::schema::{convert, is_plain_string, ToolSchemas, Untyped};
use super::ParseEvent;

/// How much whitespace to remove at one end of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trim {
    /// Keep everything.
    None,
    /// Remove one `\n` (vLLM `qwen3_coder`: the value sits on its own lines).
    OneNewline,
    /// Remove all whitespace (`str.strip()`).
    All,
}

/// Trimming of a value, per end and per kind of value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrimRules {
    /// Rule for values that stay strings: (leading, trailing).
    pub string: (Trim, Trim),
    /// Rule for every other value: (leading, trailing).
    pub other: (Trim, Trim),
}

/// Where a value's (trimmed) text goes.
#[derive(Debug)]
enum Target {
    /// Streamed as the inside of a JSON string.
    EscapedString,
    /// Collected, converted by the schema at the end.
    Collect(Option<serde_json::Value>),
    /// Streamed verbatim (raw JSON arguments, Kimi-K2).
    Raw,
}

#[derive(Debug)]
struct Value {
    target: Target,
    trim: (Trim, Trim),
    started: bool,
    held: String,
    collected: String,
}

#[derive(Debug)]
struct Call {
    index: usize,
    name: String,
    n_params: usize,
    raw: bool,
    raw_any: bool,
    value: Option<Value>,
}

/// Builds [`ParseEvent`]s for tool calls; see the module docs.
#[derive(Debug)]
pub(crate) struct Emitter {
    schemas: ToolSchemas,
    untyped: Untyped,
    id_seed: u64,
    next_index: usize,
    call: Option<Call>,
    pub(crate) out: Vec<ParseEvent>,
}

impl Emitter {
    pub(crate) fn new(schemas: ToolSchemas, untyped: Untyped, id_seed: u64) -> Self {
        Self { schemas, untyped, id_seed, next_index: 0, call: None, out: Vec::new() }
    }

    pub(crate) fn set_id_seed(&mut self, seed: u64) {
        self.id_seed = seed;
    }

    pub(crate) fn content(&mut self, text: &str) {
        push_event(&mut self.out, ParseEvent::Content(text.to_string()));
    }

    fn args(&mut self, index: usize, delta: &str) {
        push_event(&mut self.out, ParseEvent::ToolCallArguments { index, delta: delta.to_string() });
    }

    /// Opens a call. `id` is the model's own id (Kimi-K2) or `None` for a generated
    /// `call_…` id. `raw` calls take their arguments through [`Emitter::raw_args`].
    pub(crate) fn start_call(&mut self, name: &str, id: Option<String>, raw: bool) {
        self.end_call();
        let index = self.next_index;
        self.next_index += 1;
        let id = id.unwrap_or_else(|| format!("call_{:016x}{:08x}", self.id_seed, index));
        self.out.push(ParseEvent::ToolCallStart { index, id, name: name.to_string() });
        self.call = Some(Call { index, name: name.to_string(), n_params: 0, raw, raw_any: false, value: None });
        if raw {
            if let Some(c) = self.call.as_mut() {
                c.value = Some(Value {
                    target: Target::Raw,
                    trim: (Trim::All, Trim::All),
                    started: false,
                    held: String::new(),
                    collected: String::new(),
                });
            }
        } else {
            self.args(index, "{");
        }
    }

    /// Opens parameter `key` of the open call (ignored outside a call).
    pub(crate) fn start_param(&mut self, key: &str, rules: TrimRules) {
        self.end_param();
        let Some(call) = self.call.as_ref() else { return };
        let (index, n) = (call.index, call.n_params);
        let schema = self.schemas.param(&call.name, key).cloned();
        let plain = is_plain_string(schema.as_ref(), self.untyped);
        let mut head = String::new();
        if n > 0 {
            head.push_str(", ");
        }
        head.push_str(&serde_json::to_string(key).unwrap_or_else(|_| "\"\"".into()));
        head.push_str(": ");
        let (target, trim) = if plain {
            head.push('"');
            (Target::EscapedString, rules.string)
        } else {
            (Target::Collect(schema), rules.other)
        };
        self.args(index, &head);
        if let Some(c) = self.call.as_mut() {
            c.n_params += 1;
            c.value = Some(Value { target, trim, started: false, held: String::new(), collected: String::new() });
        }
    }

    /// Appends text to the open parameter value (or raw arguments).
    pub(crate) fn value_text(&mut self, text: &str) {
        let Some(call) = self.call.as_mut() else { return };
        let index = call.index;
        let Some(v) = call.value.as_mut() else { return };
        let mut text = text;
        if !v.started {
            match v.trim.0 {
                Trim::None => {}
                Trim::OneNewline => {
                    if text.is_empty() {
                        return;
                    }
                    text = text.strip_prefix('\n').unwrap_or(text);
                }
                Trim::All => {
                    text = text.trim_start();
                    if text.is_empty() {
                        return;
                    }
                }
            }
            v.started = true;
        }
        v.held.push_str(text);
        let upto = match v.trim.1 {
            Trim::None => v.held.len(),
            Trim::OneNewline if v.held.ends_with('\n') => v.held.len() - 1,
            Trim::OneNewline => v.held.len(),
            Trim::All => v.held.trim_end().len(),
        };
        if upto == 0 {
            return;
        }
        let ready: String = v.held.drain(..upto).collect();
        let emit = match &v.target {
            Target::EscapedString => {
                let esc = serde_json::to_string(&ready).unwrap_or_default();
                Some(esc.get(1..esc.len().saturating_sub(1)).unwrap_or_default().to_string())
            }
            Target::Collect(_) => {
                v.collected.push_str(&ready);
                None
            }
            Target::Raw => {
                call.raw_any = true;
                Some(ready)
            }
        };
        if let Some(s) = emit {
            self.args(index, &s);
        }
    }

    /// Same as [`Emitter::value_text`], for raw-argument calls.
    pub(crate) fn raw_args(&mut self, text: &str) {
        self.value_text(text);
    }

    /// Closes the open parameter value, if any.
    pub(crate) fn end_param(&mut self) {
        let Some(call) = self.call.as_mut() else { return };
        if call.raw {
            return;
        }
        let index = call.index;
        let Some(v) = call.value.take() else { return };
        // Whatever is still held is trailing whitespace that the trim rule removes.
        match v.target {
            Target::EscapedString => self.args(index, "\""),
            Target::Collect(schema) => {
                let json = convert(&v.collected, schema.as_ref(), self.untyped);
                self.args(index, &json);
            }
            Target::Raw => {}
        }
    }

    /// Closes the open call, if any (an open parameter is closed first).
    pub(crate) fn end_call(&mut self) {
        self.end_param();
        let Some(call) = self.call.take() else { return };
        if !call.raw {
            self.args(call.index, "}");
        } else if !call.raw_any {
            self.args(call.index, "{}");
        }
    }
}

/// Appends `ev`, merging it into the previous event when both are text of the same
/// kind (and the same call), so consumers get fewer, larger deltas.
pub(crate) fn push_event(out: &mut Vec<ParseEvent>, ev: ParseEvent) {
    match (out.last_mut(), ev) {
        (_, ParseEvent::Content(s) | ParseEvent::Reasoning(s)) if s.is_empty() => {}
        (Some(ParseEvent::Content(a)), ParseEvent::Content(b)) => a.push_str(&b),
        (Some(ParseEvent::Reasoning(a)), ParseEvent::Reasoning(b)) => a.push_str(&b),
        (
            Some(ParseEvent::ToolCallArguments { index: i, delta: a }),
            ParseEvent::ToolCallArguments { index: j, delta: b },
        ) if *i == j => a.push_str(&b),
        (_, ev) => out.push(ev),
    }
}
