//! Hugging Face chat templates rendered with minijinja, byte for byte like
//! `transformers`' `apply_chat_template`.
//!
//! The module has three axes, each in one place:
//!
//! * **Environment** ([`ChatTemplate::new`]): the Jinja dialect HF uses:
//!   `trim_blocks` + `lstrip_blocks`, no trailing newline kept, no auto
//!   escaping, loop controls, HF's `{% generation %}` block, Python string/dict methods (`.startswith`, `.split`,
//!   `.items()`, ...) through minijinja-contrib's pycompat callback, and
//!   HF's globals `raise_exception`, `strftime_now`, `bos_token` and
//!   `eos_token`, plus HF's `tojson` filter (Python `json.dumps`).
//! * **Message normalisation** ([`ChatTemplate::apply`]): what HF does to the
//!   conversation before rendering. Keys whose value is `null` are dropped,
//!   and the reasoning of a message (`reasoning_content`, `thinking` or
//!   `reasoning`) is copied under both `reasoning_content` and `thinking`.
//!   When the template does not loop over message contents, OpenAI content
//!   part lists are flattened to one string (text parts joined by `"\n"`, as
//!   vLLM does), so plain-string templates accept both content forms.
//! * **Output**: values printed by the template look like Python's (`None`,
//!   `True`, `['a', 1]`), not like minijinja's defaults (`none`, `true`).
//!
//! This module depends on no other engine module.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

/// Name under which the template is stored in its private environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template source does not parse.
    #[error("chat template does not compile: {source}")]
    Compile {
        /// The parser's error, with the line it failed on.
        #[source]
        source: minijinja::Error,
    },
    /// The template called `raise_exception(message)`, as HF templates do to
    /// reject a conversation (for example, roles that do not alternate).
    #[error("chat template raised an exception: {message}")]
    Raised {
        /// The message the template passed to `raise_exception`.
        message: String,
    },
    /// Rendering failed for another reason (an undefined attribute, a type
    /// error, an unsupported method).
    #[error("chat template failed to render: {source}")]
    Render {
        /// The renderer's error, with the template line it failed on.
        #[source]
        source: minijinja::Error,
    },
    /// The messages are not a non-empty JSON array of objects, or a content
    /// part cannot be expressed to this template.
    #[error("invalid chat messages: {reason}")]
    InvalidMessages {
        /// What is wrong with the messages.
        reason: String,
    },
}

/// Options for one rendering of a [`ChatTemplate`].
#[derive(Debug, Clone, Default)]
pub struct ChatTemplateOptions<'a> {
    /// Append the header that starts the assistant's turn.
    pub add_generation_prompt: bool,
    /// OpenAI `tools` (a JSON array of tool schemas), rendered as the
    /// template's `tools` variable; `None` renders as Python `None`.
    pub tools: Option<&'a serde_json::Value>,
    /// Extra template variables, the request's `chat_template_kwargs` (e.g.
    /// `enable_thinking`). They override `bos_token`/`eos_token`, but not
    /// `messages`, `tools`, `documents` or `add_generation_prompt`.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// How the template expects `message.content`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentFormat {
    /// The template treats content as a string: content part lists are
    /// flattened before rendering.
    String,
    /// The template loops over content parts itself: content is passed as is.
    OpenAi,
}

/// A compiled Hugging Face chat template. Compile once, render many times;
/// `Send + Sync`, so one instance serves all requests.
pub struct ChatTemplate {
    env: Environment<'static>,
    content_format: ContentFormat,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("content_format", &self.content_format)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` with HF's Jinja settings. `bos_token`/`eos_token` are
    /// the tokenizer's special tokens, exposed to the template as globals of
    /// the same names (left undefined when `None`, as HF does).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|source| ChatTemplateError::Compile { source })?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|source| ChatTemplateError::Compile { source })?;
        Ok(Self { env, content_format: detect_content_format(source), bos_token, eos_token })
    }

    /// Renders `messages`, a JSON array of OpenAI-style messages (`role`,
    /// `content` as a string or a list of `{type: "text", text}` parts,
    /// `tool_calls`, `reasoning_content`, `tool_call_id`, `name`, ...).
    pub fn apply(
        &self,
        messages: &serde_json::Value,
        opts: &ChatTemplateOptions<'_>,
    ) -> Result<String, ChatTemplateError> {
        let messages = self.normalize_messages(messages)?;
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(opts.extra.len() + 6);
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token".to_owned(), Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token".to_owned(), Value::from(eos.as_str())));
        }
        for (key, value) in &opts.extra {
            ctx.push((key.clone(), json_to_value(value)));
        }
        ctx.push(("messages".to_owned(), messages));
        ctx.push(("tools".to_owned(), opts.tools.map_or(Value::from(()), json_to_value)));
        ctx.push(("documents".to_owned(), Value::from(())));
        ctx.push(("add_generation_prompt".to_owned(), Value::from(opts.add_generation_prompt)));
        // Later entries win, so the explicit parameters override `extra`.
        let ctx = Value::from_pairs(ctx);
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|source| ChatTemplateError::Render { source })?;
        template.render(ctx).map_err(render_error)
    }

    /// Applies HF's message normalisation and returns the messages as a
    /// template value.
    fn normalize_messages(&self, messages: &serde_json::Value) -> Result<Value, ChatTemplateError> {
        let invalid = |reason: String| ChatTemplateError::InvalidMessages { reason };
        let list = messages.as_array().ok_or_else(|| invalid("messages must be a JSON array".to_owned()))?;
        if list.is_empty() {
            return Err(invalid("the conversation is empty".to_owned()));
        }
        let mut out = Vec::with_capacity(list.len());
        for (idx, message) in list.iter().enumerate() {
            let obj = message.as_object().ok_or_else(|| invalid(format!("message {idx} is not a JSON object")))?;
            // HF drops keys whose value is None: templates handle a missing
            // key, but may render a literal "None".
            let mut msg: serde_json::Map<String, serde_json::Value> =
                obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
            alias_reasoning_fields(&mut msg);
            if self.content_format == ContentFormat::String {
                if let Some(content) = msg.get_mut("content") {
                    if let Some(parts) = content.as_array() {
                        let text =
                            flatten_text_parts(parts).map_err(|reason| invalid(format!("message {idx}: {reason}")))?;
                        *content = serde_json::Value::String(text);
                    }
                }
            }
            out.push(json_to_value(&serde_json::Value::Object(msg)));
        }
        Ok(Value::from(out))
    }
}

/// Copies a message's reasoning under `reasoning_content` (the standard name)
/// and `thinking` (gpt-oss templates), like HF's `_alias_reasoning_fields`:
/// the result is `{"thinking": r, **message, "reasoning_content": r}`.
fn alias_reasoning_fields(msg: &mut serde_json::Map<String, serde_json::Value>) {
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|key| msg.get(*key).filter(|v| !v.is_null()).cloned());
    let Some(reasoning) = reasoning else {
        return;
    };
    let mut aliased = serde_json::Map::with_capacity(msg.len() + 2);
    aliased.insert("thinking".to_owned(), reasoning.clone());
    for (key, value) in std::mem::take(msg) {
        aliased.insert(key, value);
    }
    aliased.insert("reasoning_content".to_owned(), reasoning);
    *msg = aliased;
}

/// Joins the text parts of an OpenAI content list with `"\n"`.
fn flatten_text_parts(parts: &[serde_json::Value]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            serde_json::Value::String(s) => texts.push(s.as_str()),
            serde_json::Value::Object(obj) => {
                let kind = obj.get("type").and_then(|t| t.as_str()).unwrap_or("text");
                if kind != "text" {
                    return Err(format!("content part of type {kind:?} is not supported by this chat template"));
                }
                let text = obj
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| "text content part without a string `text`".to_owned())?;
                texts.push(text);
            }
            _ => return Err("content parts must be objects".to_owned()),
        }
    }
    Ok(texts.join("\n"))
}

/// Replaces HF's `{% generation %}` / `{% endgeneration %}` block (which
/// marks assistant tokens for training masks and otherwise renders its body)
/// with `{% if true %}` / `{% endif %}`, keeping the whitespace-control
/// markers so `trim_blocks`/`lstrip_blocks` act exactly as on the original.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else {
            break;
        };
        let inner = &after[..end];
        let body = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..start + 2]);
        match replacement {
            Some(keyword) => {
                let lead = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
                let trail = &inner[inner.trim_end_matches(['-', '+']).len()..];
                out.push_str(lead);
                out.push(' ');
                out.push_str(keyword);
                out.push(' ');
                out.push_str(trail);
            }
            None => out.push_str(inner),
        }
        out.push_str("%}");
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Guesses, like vLLM's content-format detection, whether the template loops
/// over message contents (`{% for part in message.content %}`): then content
/// part lists reach it unchanged; otherwise they are flattened to strings.
fn detect_content_format(source: &str) -> ContentFormat {
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else {
            break;
        };
        let tag = after[..end].trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        if let Some(for_clause) = tag.strip_prefix("for") {
            if for_clause.starts_with(char::is_whitespace) {
                if let Some((_, iterable)) = for_clause.split_once(" in ") {
                    if iterable.contains("content") {
                        return ContentFormat::OpenAi;
                    }
                }
            }
        }
        rest = &after[end + 2..];
    }
    ContentFormat::String
}

/// Converts a JSON value into a template value, keeping object key order.
fn json_to_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))))
        }
    }
}

/// Marks an error raised by the template's `raise_exception`, so `apply` can
/// report the template's own message.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// HF's `raise_exception(message)` global.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

fn render_error(err: Error) -> ChatTemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return ChatTemplateError::Raised { message: raised.0.clone() };
        }
        source = e.source();
    }
    ChatTemplateError::Render { source: err }
}

/// Prints values as Python's `str()` would: `None`, `True`, `False`, and
/// lists and dicts in their `repr` form.
fn python_formatter(out: &mut minijinja::Output, _state: &mut minijinja::State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => return out.write_str(value.as_str().unwrap_or_default()).map_err(fmt_error),
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => py_repr(value)?,
        _ => value.to_string(),
    };
    out.write_str(&text).map_err(fmt_error)
}

fn fmt_error(_: std::fmt::Error) -> Error {
    Error::new(ErrorKind::WriteFailure, "failed to write template output")
}

/// Python `repr()` of a template value.
fn py_repr(value: &Value) -> Result<String, Error> {
    let mut out = String::new();
    py_repr_into(&mut out, value)?;
    Ok(out)
}

fn py_repr_into(out: &mut String, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => py_repr_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Number => py_number(out, value),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr_into(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr_into(out, &key)?;
                out.push_str(": ");
                py_repr_into(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote
/// and no double quote.
fn py_repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Writes a number as Python does (`repr` for floats, digits for integers).
fn py_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        out.push_str(&value.to_string());
    } else {
        match f64::try_from(value.clone()) {
            Ok(f) => py_float_repr(out, f),
            Err(_) => out.push_str(&value.to_string()),
        }
    }
}

/// Python's `repr(float)` (shortest round-trip digits, exponent form below
/// 1e-4 and from 1e16), as `json.dumps` writes floats.
fn py_float_repr(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("NaN");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let decpt = exp + 1;
    if negative {
        out.push('-');
    }
    let n_digits = digits.len() as i32;
    if decpt > -4 && decpt <= 16 {
        if decpt <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-decpt) as usize));
            out.push_str(&digits);
        } else if decpt < n_digits {
            out.push_str(&digits[..decpt as usize]);
            out.push('.');
            out.push_str(&digits[decpt as usize..]);
        } else {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (decpt - n_digits) as usize));
            out.push_str(".0");
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        let _ = write!(out, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
}

/// The largest `tojson(indent=...)` accepted: real templates use 2 or 4, and
/// a huge indent would only be a way to exhaust memory.
const MAX_JSON_INDENT: usize = 64;

/// Python `json.dumps` settings that HF's `tojson` exposes.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`: Python `json.dumps`, without Jinja's HTML escaping.
fn tojson_filter(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<Value>>("ensure_ascii")?.or(ensure_ascii) {
        Some(v) => v.is_true(),
        None => false,
    };
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
            ValueKind::Bool => if v.is_true() { " " } else { "" }.to_owned(),
            _ => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?;
                let n = usize::try_from(n).unwrap_or(0);
                if n > MAX_JSON_INDENT {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent {n} is larger than {MAX_JSON_INDENT}"),
                    ));
                }
                " ".repeat(n)
            }
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(seps) if !seps.is_none() => {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.kind() == ValueKind::String && b.kind() == ValueKind::String => {
                    (a.as_str().unwrap_or_default().to_owned(), b.as_str().unwrap_or_default().to_owned())
                }
                _ => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings"))
                }
            }
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
    };
    let sort_keys = kwargs.get::<Option<Value>>("sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    json_dump(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn json_newline(out: &mut String, style: &JsonStyle, level: usize) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn json_dump(out: &mut String, value: &Value, style: &JsonStyle, level: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => py_number(out, value),
        ValueKind::String => json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(out, style, level + 1);
                json_dump(out, item, style, level + 1)?;
            }
            json_newline(out, style, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(out, style, level + 1);
                json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                json_dump(out, item, style, level + 1)?;
            }
            json_newline(out, style, level);
            out.push('}');
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// A dict key as `json.dumps` writes it: strings as is, scalars converted.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            py_number(&mut s, key);
            s
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
            ))
        }
    })
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// HF's `strftime_now(format)`. HF formats the local time; this formats UTC,
/// which is the local time of a server that runs in UTC.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime_utc(&format, secs)))
}

const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A civil UTC date and time.
struct CivilTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday.
    weekday: usize,
    /// 1-based day of the year.
    yday: u32,
}

fn civil_from_unix(secs: u64) -> CivilTime {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM_DAYS: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM_DAYS[(month - 1) as usize] + day + u32::from(leap && month > 2);
    CivilTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 3).rem_euclid(7)) as usize,
        yday,
    }
}

/// C `strftime` for the directives chat templates use, including glibc's
/// `%-d` style no-padding flag. Unknown directives are written verbatim.
fn strftime_utc(format: &str, secs: u64) -> String {
    let t = civil_from_unix(secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
        match spec {
            Some('Y') => {
                let _ = write!(out, "{}", t.year);
            }
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('m') => num(&mut out, i64::from(t.month), 2),
            Some('d') => num(&mut out, i64::from(t.day), 2),
            Some('e') => {
                let _ = write!(out, "{:>2}", t.day);
            }
            Some('H') => num(&mut out, i64::from(t.hour), 2),
            Some('I') => num(&mut out, i64::from(hour12), 2),
            Some('M') => num(&mut out, i64::from(t.minute), 2),
            Some('S') => num(&mut out, i64::from(t.second), 2),
            Some('j') => num(&mut out, i64::from(t.yday), 3),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('A') => out.push_str(WEEKDAYS[t.weekday]),
            Some('a') => out.push_str(&WEEKDAYS[t.weekday][..3]),
            Some('B') => out.push_str(MONTHS[(t.month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(t.month - 1) as usize][..3]),
            Some('F') => {
                let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
            }
            Some('T') => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))?
            .apply(&messages, &ChatTemplateOptions::default())
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.2345e-7, "1.2345e-07"),
            (123.456, "123.456"),
            (1e100, "1e+100"),
            (0.1 + 0.2, "0.30000000000000004"),
        ];
        for (f, want) in cases {
            let mut s = String::new();
            py_float_repr(&mut s, f);
            assert_eq!(s, want, "repr({f})");
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let messages = json!([{"role": "user", "content": "x"}]);
        let t = |src: &str| render(src, messages.clone());
        let src = r#"{{ {"b": [1, 2.5, none, true], "a": "é\"<>&\n\u0001"} | tojson }}"#;
        assert_eq!(t(src).unwrap(), r#"{"b": [1, 2.5, null, true], "a": "é\"<>&\n\u0001"}"#);
        let src = r#"{{ {"b": [1, {}], "a": []} | tojson(indent=2, sort_keys=true) }}"#;
        assert_eq!(t(src).unwrap(), "{\n  \"a\": [],\n  \"b\": [\n    1,\n    {}\n  ]\n}");
        let src = r#"{{ "é😀" | tojson(ensure_ascii=true) }}"#;
        assert_eq!(t(src).unwrap(), r#""\u00e9\ud83d\ude00""#);
        let src = r#"{{ [1, 2] | tojson(separators=(",", ":")) }}"#;
        assert_eq!(t(src).unwrap(), "[1,2]");
    }

    #[test]
    fn raise_exception_carries_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([{"role": "user"}])).unwrap_err();
        match err {
            ChatTemplateError::Raised { message } => assert_eq!(message, "roles must alternate"),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn compile_error_is_reported() {
        let err = ChatTemplate::new("{% if %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Compile { .. }), "{err:?}");
    }

    #[test]
    fn invalid_messages_are_rejected() {
        let t = ChatTemplate::new("x", None, None).unwrap();
        let opts = ChatTemplateOptions::default();
        assert!(t.apply(&json!({}), &opts).is_err());
        assert!(t.apply(&json!([]), &opts).is_err());
        assert!(t.apply(&json!(["user"]), &opts).is_err());
    }

    #[test]
    fn globals_and_python_printing() {
        let src = "{{ bos_token }}|{{ eos_token }}|{{ none }}|{{ true }}|{{ [1, 'a'] }}|{{ {'k': none} }}|{{ tools }}|{{ add_generation_prompt }}";
        assert_eq!(
            render(src, json!([{"role": "user"}])).unwrap(),
            "<s>|</s>|None|True|[1, 'a']|{'k': None}|None|False"
        );
        let t = ChatTemplate::new("{{ bos_token is defined }}", None, None).unwrap();
        let out = t.apply(&json!([{"role": "user"}]), &ChatTemplateOptions::default());
        assert_eq!(out.unwrap(), "False");
    }

    #[test]
    fn pycompat_methods_and_whitespace() {
        let src = "{% for m in messages %}\n  {{ m.content.strip().split(',')[-1].startswith('b') }}\n{% endfor %}\n";
        assert_eq!(render(src, json!([{"role": "user", "content": " a,b "}])).unwrap(), "  True\n");
    }

    #[test]
    fn null_keys_dropped_and_reasoning_aliased() {
        let src = "{% for m in messages %}{{ m.content is defined }} {{ m|tojson }}\n{% endfor %}";
        let out = render(
            src,
            json!([
                {"role": "assistant", "content": null, "reasoning": "r"},
                {"role": "assistant", "content": "c", "thinking": "t", "reasoning_content": null}
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            "False {\"thinking\": \"r\", \"role\": \"assistant\", \"reasoning\": \"r\", \"reasoning_content\": \"r\"}\n\
             True {\"thinking\": \"t\", \"role\": \"assistant\", \"content\": \"c\", \"reasoning_content\": \"t\"}\n"
        );
    }

    #[test]
    fn content_parts_flattened_only_for_string_templates() {
        let messages = json!([{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}
        ]}]);
        let string_src = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(render(string_src, messages.clone()).unwrap(), "a\nb");
        let parts_src = "{% for m in messages %}{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endfor %}";
        assert_eq!(render(parts_src, messages).unwrap(), "[a][b]");
        let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(matches!(render(string_src, image), Err(ChatTemplateError::InvalidMessages { .. })));
    }

    #[test]
    fn generation_block_renders_its_body() {
        let src =
            "{% for m in messages %}\n  {%- generation -%}\n  [{{ m.content }}]\n  {% endgeneration %}\n{% endfor %}";
        let plain = "{% for m in messages %}\n  {%- if true -%}\n  [{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let messages = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
        let got = render(src, messages.clone()).unwrap();
        assert_eq!(got, render(plain, messages).unwrap());
        assert_eq!(got, "[a]\n[b]\n");
    }

    #[test]
    fn extra_kwargs_reach_template() {
        let t = ChatTemplate::new("{{ enable_thinking }}", None, None).unwrap();
        let mut opts = ChatTemplateOptions::default();
        opts.extra.insert("enable_thinking".into(), json!(false));
        assert_eq!(t.apply(&json!([{"role": "user"}]), &opts).unwrap(), "False");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let secs = 1_709_211_909;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %-d %I%p %y %% %Q", secs),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 29 01PM 24 % %Q"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
    }
}
