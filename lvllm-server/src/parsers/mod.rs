//! Tool-call and reasoning parsers: turn a model's raw text into OpenAI
//! `reasoning_content`, `content` and `tool_calls`, in one piece or incrementally.
//!
//! Three axes, each in one place:
//! - **reasoning** (`reasoning.rs`): where `<think>…</think>` ends, per family
//!   ([`ReasoningParserKind`]), and where the output starts ([`ReasoningStart`]);
//! - **tool-call format** (`hermes.rs`, `qwen3_coder.rs`, `glm.rs`,
//!   `minimax_m2.rs`, `kimi_k2.rs`): the markers each family writes, as a state machine over the
//!   text ([`ToolParserKind`]);
//! - **argument building and typing** (`emit.rs`, `schema.rs`): the arguments JSON
//!   string, with values typed by the request's `tools` schema.
//!
//! Every parser is written once, as a streaming state machine: [`push`] a delta,
//! get the [`ParseEvent`]s it resolves; text that might still become a marker (a
//! trailing `<tool_c`) is held back until the next delta or [`finish`]. The
//! non-streaming result ([`ParsedOutput`]) is the same events gathered, so both
//! paths agree for any split of the text. [`OutputParser`] chains a reasoning
//! parser and a tool parser (tool calls are looked for in the content only).
//!
//! [`push`]: OutputParser::push
//! [`finish`]: OutputParser::finish

mod emit;
mod glm;
mod hermes;
mod kimi_k2;
mod minimax_m2;
mod qwen3_coder;
mod reasoning;
mod scan;
mod schema;

use std::hash::BuildHasher;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use reasoning::{ReasoningParser, ReasoningParserKind, ReasoningStart};

use emit::Emitter;
use schema::{ToolSchemas, Untyped};

/// Errors of this module.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParserError {
    /// The `tool-call-parser` setting names no known parser.
    #[error("unknown tool-call parser `{name}`; supported: {}", ToolParserKind::names().join(", "))]
    UnknownToolParser {
        /// The name as given.
        name: String,
    },
    /// The `reasoning-parser` setting names no known parser.
    #[error("unknown reasoning parser `{name}`; supported: {}", ReasoningParserKind::names().join(", "))]
    UnknownReasoningParser {
        /// The name as given.
        name: String,
    },
}

/// One piece of parsed output, in order. Adjacent pieces of the same kind are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseEvent {
    /// Text of the answer (`delta.content`).
    Content(String),
    /// Text of the reasoning (`delta.reasoning_content`).
    Reasoning(String),
    /// A tool call begins (`delta.tool_calls[i]` with `id`, `type` and `function.name`).
    ToolCallStart {
        /// Position of the call in this response's `tool_calls`.
        index: usize,
        /// The call id (`call_…`, or the model's own id for Kimi-K2).
        id: String,
        /// The function name.
        name: String,
    },
    /// More of a call's arguments JSON string (`delta.tool_calls[i].function.arguments`).
    ToolCallArguments {
        /// Position of the call in this response's `tool_calls`.
        index: usize,
        /// The next piece of the arguments string.
        delta: String,
    },
}

/// The `function` of an OpenAI tool call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function name.
    pub name: String,
    /// The arguments, a JSON object serialized as a string.
    pub arguments: String,
}

/// An OpenAI tool call: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call id.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// A complete output, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// The reasoning, if any.
    pub reasoning_content: Option<String>,
    /// The answer text; `None` when empty, or only whitespace next to tool calls.
    pub content: Option<String>,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    /// Gathers a stream of events into the non-streaming result.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a ParseEvent>) -> Self {
        let mut reasoning = String::new();
        let mut content = String::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        for e in events {
            match e {
                ParseEvent::Content(s) => content.push_str(s),
                ParseEvent::Reasoning(s) => reasoning.push_str(s),
                ParseEvent::ToolCallStart { id, name, .. } => calls.push(ToolCall {
                    id: id.clone(),
                    kind: "function".into(),
                    function: FunctionCall { name: name.clone(), arguments: String::new() },
                }),
                ParseEvent::ToolCallArguments { index, delta } => {
                    if let Some(c) = calls.get_mut(*index) {
                        c.function.arguments.push_str(delta);
                    }
                }
            }
        }
        let content =
            if content.is_empty() || (!calls.is_empty() && content.trim().is_empty()) { None } else { Some(content) };
        Self { reasoning_content: (!reasoning.is_empty()).then_some(reasoning), content, tool_calls: calls }
    }
}

/// The tool-call parser families, selected by the `tool-call-parser` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ToolParserKind {
    /// `qwen3_coder`: `<tool_call><function=NAME><parameter=P>V</parameter>…`.
    Qwen3Coder,
    /// `glm45`: `<tool_call>NAME\n<arg_key>K</arg_key><arg_value>V</arg_value>…`.
    Glm45,
    /// `glm47`: as `glm45`, the name may be followed directly by `<arg_key>`.
    Glm47,
    /// `minimax_m2`: `<minimax:tool_call><invoke name="NAME"><parameter name="P">V</parameter>…`.
    MinimaxM2,
    /// `kimi_k2`: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:N<|tool_call_argument_begin|>{json}…`.
    KimiK2,
    /// `hermes`: `<tool_call>{"name": NAME, "arguments": {…}}</tool_call>` (Qwen3, Qwen3-MoE, Qwen2.5).
    Hermes,
}

impl ToolParserKind {
    /// Every kind with its name.
    pub const ALL: [(&'static str, ToolParserKind); 6] = [
        ("qwen3_coder", Self::Qwen3Coder),
        ("glm45", Self::Glm45),
        ("glm47", Self::Glm47),
        ("minimax_m2", Self::MinimaxM2),
        ("kimi_k2", Self::KimiK2),
        ("hermes", Self::Hermes),
    ];

    /// The supported names, for error messages and `--help`.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(n, _)| *n).collect()
    }

    /// The kind called `name` (case-insensitive, `-` and `_` alike).
    pub fn from_name(name: &str) -> Result<Self, ParserError> {
        kind_by_name(&Self::ALL, name).ok_or_else(|| ParserError::UnknownToolParser { name: name.to_string() })
    }

    /// The setting's name of this kind.
    pub fn name(self) -> &'static str {
        name_of_kind(&Self::ALL, self)
    }
}

/// The kind called `name` in a `(name, kind)` table (case-insensitive, `-` and
/// `_` alike).
pub(crate) fn kind_by_name<K: Copy>(all: &[(&'static str, K)], name: &str) -> Option<K> {
    let norm = name.trim().to_ascii_lowercase().replace('-', "_");
    all.iter().find(|(n, _)| *n == norm).map(|(_, k)| *k)
}

/// The name of `kind` in a `(name, kind)` table.
pub(crate) fn name_of_kind<K: PartialEq>(all: &[(&'static str, K)], kind: K) -> &'static str {
    all.iter().find(|(_, k)| *k == kind).map_or("", |(n, _)| n)
}

/// Whether a state machine step consumed something or needs more text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Progress,
    Wait,
}

/// One tool-call format as a state machine over the unconsumed text `buf`.
/// A step consumes only what is decided; with `at_end` everything is decided.
pub(crate) trait Format: std::fmt::Debug + Send {
    fn step(&mut self, buf: &mut String, at_end: bool, em: &mut Emitter) -> Step;
}

fn random_seed() -> u64 {
    // Each `RandomState` has fresh random keys: enough for unique call ids.
    std::collections::hash_map::RandomState::new().hash_one(0x6c766c6c6du64)
}

/// An incremental tool-call parser for one response.
#[derive(Debug)]
pub struct ToolParser {
    kind: ToolParserKind,
    format: Box<dyn Format>,
    em: Emitter,
    buf: String,
}

impl ToolParser {
    /// A parser of family `kind`; `tools` is the request's `tools` list (OpenAI
    /// JSON schema), used to type argument values. Call ids are random.
    pub fn new(kind: ToolParserKind, tools: &[Value]) -> Self {
        let schemas = ToolSchemas::new(tools);
        let (format, untyped): (Box<dyn Format>, Untyped) = match kind {
            ToolParserKind::Qwen3Coder => (Box::new(qwen3_coder::Qwen3Coder::new()), Untyped::String),
            ToolParserKind::Glm45 | ToolParserKind::Glm47 => (Box::new(glm::Glm::new()), Untyped::Json),
            ToolParserKind::MinimaxM2 => (Box::new(minimax_m2::MinimaxM2::new()), Untyped::String),
            ToolParserKind::KimiK2 => (Box::new(kimi_k2::KimiK2::new()), Untyped::Json),
            ToolParserKind::Hermes => (Box::new(hermes::Hermes::new()), Untyped::Json),
        };
        Self { kind, format, em: Emitter::new(schemas, untyped, random_seed()), buf: String::new() }
    }

    /// [`ToolParser::new`] by the setting's name; unknown names are an error
    /// listing the supported ones.
    pub fn by_name(name: &str, tools: &[Value]) -> Result<Self, ParserError> {
        Ok(Self::new(ToolParserKind::from_name(name)?, tools))
    }

    /// Makes call ids deterministic: `call_{seed:016x}{index:08x}` (for tests).
    pub fn with_id_seed(mut self, seed: u64) -> Self {
        self.em.set_id_seed(seed);
        self
    }

    /// The family of this parser.
    pub fn kind(&self) -> ToolParserKind {
        self.kind
    }

    /// Feeds one delta of content; returns the events it resolves.
    pub fn push(&mut self, delta: &str) -> Vec<ParseEvent> {
        self.buf.push_str(delta);
        self.run(false);
        std::mem::take(&mut self.em.out)
    }

    /// Ends the output: held-back text is resolved, an open call is closed.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        self.run(true);
        self.em.end_call();
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.em.content(&rest);
        }
        std::mem::take(&mut self.em.out)
    }

    /// Parses a complete output.
    pub fn parse(mut self, text: &str) -> ParsedOutput {
        let mut events = self.push(text);
        events.extend(self.finish());
        ParsedOutput::from_events(&events)
    }

    fn run(&mut self, at_end: bool) {
        // Each `Progress` consumes text or changes state; a bound guards against a
        // state machine bug turning into a hung request.
        let mut budget = 4 * self.buf.len() + 64;
        while self.format.step(&mut self.buf, at_end, &mut self.em) == Step::Progress {
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
    }
}

/// A reasoning parser and a tool parser chained: reasoning is split off first,
/// tool calls are looked for in the content. Either may be absent.
#[derive(Debug)]
pub struct OutputParser {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolParser>,
}

impl OutputParser {
    /// Chains the given parsers (both `None`: everything is content).
    pub fn new(reasoning: Option<ReasoningParser>, tools: Option<ToolParser>) -> Self {
        Self { reasoning, tools }
    }

    /// Feeds one delta of model output; returns the events it resolves.
    pub fn push(&mut self, delta: &str) -> Vec<ParseEvent> {
        let first = match self.reasoning.as_mut() {
            Some(r) => r.push(delta),
            None => vec![ParseEvent::Content(delta.to_string())],
        };
        self.route(first, false)
    }

    /// Ends the output; returns the remaining events.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        let first = match self.reasoning.as_mut() {
            Some(r) => r.finish(),
            None => Vec::new(),
        };
        self.route(first, true)
    }

    /// Parses a complete output.
    pub fn parse(mut self, text: &str) -> ParsedOutput {
        let mut events = self.push(text);
        events.extend(self.finish());
        ParsedOutput::from_events(&events)
    }

    fn route(&mut self, events: Vec<ParseEvent>, at_end: bool) -> Vec<ParseEvent> {
        let mut out = Vec::new();
        for e in events {
            match (e, self.tools.as_mut()) {
                (ParseEvent::Content(c), Some(t)) => t.push(&c).into_iter().for_each(|e| emit::push_event(&mut out, e)),
                (e, _) => emit::push_event(&mut out, e),
            }
        }
        if at_end {
            if let Some(t) = self.tools.as_mut() {
                t.finish().into_iter().for_each(|e| emit::push_event(&mut out, e));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
