//! Reasoning parsers: split model output into `reasoning_content` and `content`
//! at `<think>…</think>` (vLLM `reasoning/*.py`).
//!
//! | name | output starts in | ends reasoning | vLLM class |
//! |---|---|---|---|
//! | `qwen3` | reasoning (`<think>` optional) | `</think>`, or `<tool_call>` followed by `<function` | `Qwen3ReasoningParser` |
//! | `deepseek_r1` | reasoning (`<think>` optional) | `</think>` | `DeepSeekR1ReasoningParser` |
//! | `minimax_m2` | reasoning (`<think>` optional) | `</think>` | `MiniMaxM2ReasoningParser` |
//! | `kimi_k2` | reasoning (`<think>` optional) | `</think>`, or `<|tool_calls_section_begin|>` | `KimiK2ReasoningParser` |
//! | `glm45` | content, unless the output opens with `<think>` | `</think>` | `Glm4MoeModelReasoningParser` |
//! | `minimax_m2_append_think` | content: nothing is split, `<think>` is prepended to the content | — | `MiniMaxM2AppendThinkReasoningParser` |
//!
//! Where the output starts also depends on the prompt: a chat template that ends
//! the prompt with an open `<think>` (Qwen3-Thinking-2507, Qwen3.5, GLM-4.7,
//! Kimi-K2.5) makes the output start inside reasoning with only `</think>` in it;
//! one that ends with `<think></think>` (thinking disabled) makes it all content.
//! [`ReasoningStart::from_prompt`] reads that from the rendered prompt.
//!
//! Differences from vLLM, on purpose: whitespace right after `</think>` is dropped
//! (vLLM keeps the `\n\n` at the start of `content`); only a `<think>` at the very
//! start of the output (after whitespace) is removed, not one in the middle.

use super::emit::push_event;
use super::scan::{consume, find_first, hold_len, lead, leading_ws, Lead};
use super::{ParseEvent, ParserError};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const QWEN_TOOL_CALL: &str = "<tool_call>";
const QWEN_FUNCTION: &str = "<function";
const KIMI_SECTION: [&str; 2] = ["<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"];

/// The reasoning-parser families, selected by the `reasoning-parser` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReasoningParserKind {
    /// `qwen3`: Qwen3 / Qwen3-Next / Qwen3.5.
    Qwen3,
    /// `deepseek_r1`: DeepSeek-R1 style (`</think>` only).
    DeepseekR1,
    /// `glm45`: GLM-4.5/4.6/4.7 (reasoning only when the output opens `<think>`).
    Glm45,
    /// `minimax_m2`: MiniMax-M2 split at `</think>`.
    MinimaxM2,
    /// `minimax_m2_append_think`: MiniMax-M2 with the thinking kept in `content`.
    MinimaxM2AppendThink,
    /// `kimi_k2`: Kimi-K2 / K2.5 (a tool-call section also ends reasoning).
    KimiK2,
}

impl ReasoningParserKind {
    /// Every kind with its name.
    pub const ALL: [(&'static str, ReasoningParserKind); 6] = [
        ("qwen3", Self::Qwen3),
        ("deepseek_r1", Self::DeepseekR1),
        ("glm45", Self::Glm45),
        ("minimax_m2", Self::MinimaxM2),
        ("minimax_m2_append_think", Self::MinimaxM2AppendThink),
        ("kimi_k2", Self::KimiK2),
    ];

    /// The supported names, for error messages and `--help`.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(n, _)| *n).collect()
    }

    /// The kind called `name` (case-insensitive, `-` and `_` alike).
    pub fn from_name(name: &str) -> Result<Self, ParserError> {
        super::kind_by_name(&Self::ALL, name)
            .ok_or_else(|| ParserError::UnknownReasoningParser { name: name.to_string() })
    }

    /// The setting's name of this kind.
    pub fn name(self) -> &'static str {
        super::name_of_kind(&Self::ALL, self)
    }
}

/// Where the model's output starts, as far as reasoning is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReasoningStart {
    /// The family's default (see the module table).
    #[default]
    Auto,
    /// The prompt opened `<think>`: the output starts inside reasoning.
    InReasoning,
    /// The prompt closed the thinking block (thinking disabled): all content.
    InContent,
}

impl ReasoningStart {
    /// Reads the end of the rendered prompt: an open `<think>` (possibly followed
    /// by whitespace) → [`ReasoningStart::InReasoning`]; a closing `</think>` →
    /// [`ReasoningStart::InContent`]; anything else → [`ReasoningStart::Auto`].
    pub fn from_prompt(prompt: &str) -> Self {
        let tail = prompt.trim_end();
        if tail.ends_with(THINK_OPEN) {
            Self::InReasoning
        } else if tail.ends_with(THINK_CLOSE) {
            Self::InContent
        } else {
            Self::Auto
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Reasoning,
    AfterEnd,
    Content,
}

/// An incremental reasoning parser: feed text deltas, get [`ParseEvent::Reasoning`]
/// and [`ParseEvent::Content`] events. Text that could still be the start of a
/// marker is held back until the next delta (or [`ReasoningParser::finish`]).
#[derive(Debug)]
pub struct ReasoningParser {
    kind: ReasoningParserKind,
    start: ReasoningStart,
    state: State,
    buf: String,
    out: Vec<ParseEvent>,
}

enum Step {
    Progress,
    Wait,
}

impl ReasoningParser {
    /// A parser of family `kind` for an output that starts as `start` says.
    pub fn new(kind: ReasoningParserKind, start: ReasoningStart) -> Self {
        Self { kind, start, state: State::Start, buf: String::new(), out: Vec::new() }
    }

    /// The family of this parser.
    pub fn kind(&self) -> ReasoningParserKind {
        self.kind
    }

    /// Feeds one delta of model output; returns the events it resolves.
    pub fn push(&mut self, delta: &str) -> Vec<ParseEvent> {
        self.buf.push_str(delta);
        self.run(false);
        std::mem::take(&mut self.out)
    }

    /// Ends the output: everything still held back is resolved.
    pub fn finish(&mut self) -> Vec<ParseEvent> {
        self.run(true);
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.emit_current(&rest);
        }
        std::mem::take(&mut self.out)
    }

    /// Splits a complete output: (reasoning_content, content), `None` when empty.
    pub fn parse(mut self, text: &str) -> (Option<String>, Option<String>) {
        let mut events = self.push(text);
        events.extend(self.finish());
        let mut reasoning = String::new();
        let mut content = String::new();
        for e in events {
            match e {
                ParseEvent::Reasoning(s) => reasoning.push_str(&s),
                ParseEvent::Content(s) => content.push_str(&s),
                _ => {}
            }
        }
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        (none_if_empty(reasoning), none_if_empty(content))
    }

    fn emit_current(&mut self, text: &str) {
        let ev = match self.state {
            State::Start | State::Reasoning => ParseEvent::Reasoning(text.to_string()),
            State::AfterEnd | State::Content => ParseEvent::Content(text.to_string()),
        };
        push_event(&mut self.out, ev);
    }

    fn reasoning(&mut self, text: &str) {
        push_event(&mut self.out, ParseEvent::Reasoning(text.to_string()));
    }

    fn content(&mut self, text: &str) {
        push_event(&mut self.out, ParseEvent::Content(text.to_string()));
    }

    fn run(&mut self, at_end: bool) {
        while let Step::Progress = self.step(at_end) {}
    }

    fn implicit_ends(&self) -> &'static [&'static str] {
        match self.kind {
            ReasoningParserKind::Qwen3 => &[QWEN_TOOL_CALL],
            ReasoningParserKind::KimiK2 => &KIMI_SECTION,
            _ => &[],
        }
    }

    fn step(&mut self, at_end: bool) -> Step {
        match self.state {
            State::Start => {
                if self.kind == ReasoningParserKind::MinimaxM2AppendThink {
                    self.content(THINK_OPEN);
                    self.state = State::Content;
                    return Step::Progress;
                }
                if self.start == ReasoningStart::InContent {
                    self.state = State::Content;
                    return Step::Progress;
                }
                let ws = leading_ws(&self.buf);
                match lead(&self.buf[ws..], &[THINK_OPEN]) {
                    Lead::Full(_) => {
                        consume(&mut self.buf, ws + THINK_OPEN.len());
                        self.state = State::Reasoning;
                    }
                    Lead::Partial if !at_end => return Step::Wait,
                    _ => {
                        let explicit = self.kind == ReasoningParserKind::Glm45 && self.start == ReasoningStart::Auto;
                        self.state = if explicit { State::Content } else { State::Reasoning };
                    }
                }
                Step::Progress
            }
            State::Reasoning => {
                let implicit = self.implicit_ends();
                let mut markers = vec![THINK_CLOSE];
                markers.extend_from_slice(implicit);
                match find_first(&self.buf, &markers) {
                    Some((i, 0)) => {
                        let r = self.buf[..i].to_string();
                        self.reasoning(&r);
                        consume(&mut self.buf, i + THINK_CLOSE.len());
                        self.state = State::AfterEnd;
                        Step::Progress
                    }
                    Some((i, m)) if markers[m] == QWEN_TOOL_CALL => {
                        let after = &self.buf[i + QWEN_TOOL_CALL.len()..];
                        let t = after.trim_start();
                        let r = self.buf[..i].to_string();
                        if t.starts_with(QWEN_FUNCTION) {
                            self.reasoning(&r);
                            consume(&mut self.buf, i);
                            self.state = State::Content;
                            Step::Progress
                        } else if QWEN_FUNCTION.starts_with(t) && !at_end {
                            self.reasoning(&r);
                            consume(&mut self.buf, i);
                            Step::Wait
                        } else {
                            // A `<tool_call>` mentioned in the reasoning, not a call.
                            let upto = i + QWEN_TOOL_CALL.len();
                            let r = self.buf[..upto].to_string();
                            self.reasoning(&r);
                            consume(&mut self.buf, upto);
                            Step::Progress
                        }
                    }
                    Some((i, _)) => {
                        let r = self.buf[..i].to_string();
                        self.reasoning(&r);
                        consume(&mut self.buf, i);
                        self.state = State::Content;
                        Step::Progress
                    }
                    None => {
                        let keep = if at_end { 0 } else { hold_len(&self.buf, &markers) };
                        let n = self.buf.len() - keep;
                        if n == 0 {
                            return Step::Wait;
                        }
                        let r = self.buf[..n].to_string();
                        self.reasoning(&r);
                        consume(&mut self.buf, n);
                        Step::Progress
                    }
                }
            }
            State::AfterEnd => {
                let ws = leading_ws(&self.buf);
                consume(&mut self.buf, ws);
                if self.buf.is_empty() {
                    return Step::Wait;
                }
                self.state = State::Content;
                Step::Progress
            }
            State::Content => {
                if self.buf.is_empty() {
                    return Step::Wait;
                }
                let c = std::mem::take(&mut self.buf);
                self.content(&c);
                Step::Wait
            }
        }
    }
}
