//! Parameter typing: the request's `tools` (OpenAI JSON-schema list) decide how a
//! parameter value written as text by the model becomes a JSON value, as vLLM's
//! XML-style parsers do.
//!
//! Rules, shared by every parser (vLLM's `qwen3_coder` and `minimax_m2` rules,
//! merged):
//! - A parameter whose declared types are only string-like keeps the raw text,
//!   even `null` (so it can be streamed as it arrives).
//! - A nullable parameter (`"null"` among its types) maps `null`/`None` to JSON null;
//!   so does any parameter with no string-like type.
//! - Otherwise the declared types are tried most specific first: integer, number
//!   (integral values become integers), boolean (`true`/`false`, any case),
//!   object, array (parsed as JSON). Then a declared string type keeps the text.
//! - Nothing fits: valid JSON is kept as JSON, Python literals `True`/`False`/`None`
//!   become `true`/`false`/`null`, anything else stays a string.
//! - A parameter the schema does not describe is "untyped": each parser picks
//!   [`Untyped::String`] or [`Untyped::Json`] (the fallback above).

use std::collections::HashMap;

use serde_json::{Map, Value};

/// How a parser treats a parameter that the tool schema does not type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Untyped {
    /// Keep the text as a JSON string (vLLM `qwen3_coder`, `minimax_m2`).
    String,
    /// Parse it as JSON if possible (vLLM `glm45`).
    Json,
}

/// The `properties` object of every tool in the request, by function name.
#[derive(Clone, Debug, Default)]
pub(crate) struct ToolSchemas {
    by_name: HashMap<String, Map<String, Value>>,
}

impl ToolSchemas {
    /// Reads an OpenAI `tools` list (`[{"type":"function","function":{"name",
    /// "parameters"}}]`; the flat `{"name","parameters"}` form is accepted too).
    /// Entries without a name are skipped: the schema only refines typing.
    pub(crate) fn new(tools: &[Value]) -> Self {
        let mut by_name = HashMap::new();
        for tool in tools {
            let f = tool.get("function").unwrap_or(tool);
            let Some(name) = f.get("name").and_then(Value::as_str) else { continue };
            let props = f
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            by_name.insert(name.to_string(), props);
        }
        Self { by_name }
    }

    /// The schema of parameter `param` of tool `tool`, if declared.
    pub(crate) fn param(&self, tool: &str, param: &str) -> Option<&Value> {
        self.by_name.get(tool)?.get(param)
    }
}

const STRING_TYPES: &[&str] = &["string", "str", "text", "varchar", "char", "enum"];

/// Every type a schema admits, lower-cased: `type` (string or list), types of
/// `enum` values, and recursively `anyOf`/`oneOf`/`allOf`.
fn schema_types(schema: &Value, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else { return };
    match obj.get("type") {
        Some(Value::String(t)) => out.push(t.trim().to_lowercase()),
        Some(Value::Array(ts)) => out.extend(ts.iter().filter_map(Value::as_str).map(|t| t.trim().to_lowercase())),
        _ => {}
    }
    if let Some(Value::Array(vals)) = obj.get("enum") {
        for v in vals {
            let t = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_f64() => "number",
                Value::Number(_) => "integer",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            out.push(t.to_string());
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(choices)) = obj.get(key) {
            for c in choices {
                schema_types(c, out);
            }
        }
    }
}

/// The declared types of a parameter; empty when untyped.
fn declared_types(schema: Option<&Value>) -> Vec<String> {
    let mut types = Vec::new();
    if let Some(s) = schema {
        schema_types(s, &mut types);
    }
    types
}

fn is_string_type(t: &str) -> bool {
    STRING_TYPES.contains(&t)
}

/// True when the value will certainly stay the raw text, so it may be streamed
/// as a JSON string while it is generated.
pub(crate) fn is_plain_string(schema: Option<&Value>, untyped: Untyped) -> bool {
    let types = declared_types(schema);
    if types.is_empty() {
        return untyped == Untyped::String;
    }
    types.iter().all(|t| is_string_type(t))
}

fn is_null_word(raw: &str) -> bool {
    raw.eq_ignore_ascii_case("null") || raw.eq_ignore_ascii_case("none")
}

fn to_json_string(raw: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(raw).unwrap_or_else(|_| String::from("\"\""))
}

/// Converts a parameter's text to JSON text by its schema (module docs).
pub(crate) fn convert(raw: &str, schema: Option<&Value>, untyped: Untyped) -> String {
    let types = declared_types(schema);
    if types.is_empty() {
        return match untyped {
            Untyped::String => to_json_string(raw),
            Untyped::Json => fallback(raw),
        };
    }
    let has_string = types.iter().any(|t| is_string_type(t));
    let has_null = types.iter().any(|t| t == "null");
    if has_null && is_null_word(raw) {
        return "null".into();
    }
    if has_string && types.iter().all(|t| is_string_type(t) || t == "null") {
        return to_json_string(raw);
    }
    if !has_string && is_null_word(raw) {
        return "null".into();
    }
    let declared = |pred: &dyn Fn(&str) -> bool| types.iter().any(|t| pred(t));
    let is_int = |t: &str| ["int", "uint", "long", "short", "unsigned"].iter().any(|p| t.starts_with(p));
    let is_num = |t: &str| ["num", "float", "double"].iter().any(|p| t.starts_with(p));
    let is_bool = |t: &str| matches!(t, "boolean" | "bool" | "binary");
    let is_obj = |t: &str| t == "object" || t.starts_with("dict");
    let is_arr = |t: &str| matches!(t, "array" | "arr") || t.starts_with("list");
    let text = raw.trim();
    if declared(&is_int) {
        if let Ok(i) = text.parse::<i64>() {
            return i.to_string();
        }
    }
    if declared(&is_num) {
        if let Some(n) = number(text) {
            return n;
        }
    }
    if declared(&is_bool) {
        if text.eq_ignore_ascii_case("true") {
            return "true".into();
        }
        if text.eq_ignore_ascii_case("false") {
            return "false".into();
        }
    }
    if declared(&is_obj) && serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()) {
        return text.to_string();
    }
    if declared(&is_arr) && serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_array()) {
        return text.to_string();
    }
    if has_string {
        return to_json_string(raw);
    }
    fallback(raw)
}

/// A float written by the model; integral values become integers (as vLLM does).
fn number(text: &str) -> Option<String> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(i.to_string());
    }
    let f = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        // The guard keeps the value exactly representable as an i64.
        return Some((f as i64).to_string());
    }
    serde_json::Number::from_f64(f).map(|n| n.to_string())
}

/// Untyped or unmatched text: JSON if it parses, Python's three literals, else a string.
fn fallback(raw: &str) -> String {
    let text = raw.trim();
    if serde_json::from_str::<Value>(text).is_ok() {
        return text.to_string();
    }
    match text {
        "True" => "true".into(),
        "False" => "false".into(),
        "None" => "null".into(),
        _ => to_json_string(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c(raw: &str, schema: Value) -> String {
        convert(raw, Some(&schema), Untyped::String)
    }

    #[test]
    fn typed_conversion() {
        assert_eq!(c("Paris", json!({"type": "string"})), "\"Paris\"");
        assert_eq!(c("null", json!({"type": "string"})), "\"null\"");
        assert_eq!(c("null", json!({"type": ["string", "null"]})), "null");
        assert_eq!(c("5", json!({"type": "integer"})), "5");
        assert_eq!(c("5.0", json!({"type": "number"})), "5");
        assert_eq!(c("2.5", json!({"type": "number"})), "2.5");
        assert_eq!(c("five", json!({"type": "integer"})), "\"five\"");
        assert_eq!(c("True", json!({"type": "boolean"})), "true");
        assert_eq!(c("{\"a\": [1, 2]}", json!({"type": "object"})), "{\"a\": [1, 2]}");
        assert_eq!(c("[1,2]", json!({"type": "array"})), "[1,2]");
        assert_eq!(c("[1,2", json!({"type": "array"})), "\"[1,2\"");
        assert_eq!(c("7", json!({"anyOf": [{"type": "integer"}, {"type": "null"}]})), "7");
        assert_eq!(c("None", json!({"anyOf": [{"type": "integer"}, {"type": "null"}]})), "null");
        assert_eq!(c("b", json!({"enum": ["a", "b"]})), "\"b\"");
        assert_eq!(c("2", json!({"enum": [1, 2]})), "2");
    }

    #[test]
    fn untyped_conversion() {
        assert_eq!(convert("42", None, Untyped::String), "\"42\"");
        assert_eq!(convert("42", None, Untyped::Json), "42");
        assert_eq!(convert("True", None, Untyped::Json), "true");
        assert_eq!(convert("hi \"x\"", None, Untyped::Json), "\"hi \\\"x\\\"\"");
        assert_eq!(convert("{\"k\": 1}", Some(&json!({"description": "no type"})), Untyped::Json), "{\"k\": 1}");
    }

    #[test]
    fn schemas_from_tools() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"n": {"type": "integer"}}}}}),
            json!({"name": "flat", "parameters": {"properties": {"s": {"type": "string"}}}}),
            json!({"type": "function"}),
        ];
        let s = ToolSchemas::new(&tools);
        assert_eq!(s.param("f", "n"), Some(&json!({"type": "integer"})));
        assert!(s.param("flat", "s").is_some());
        assert!(s.param("f", "missing").is_none());
        assert!(is_plain_string(s.param("flat", "s"), Untyped::Json));
        assert!(!is_plain_string(s.param("f", "n"), Untyped::String));
        assert!(is_plain_string(None, Untyped::String));
        assert!(!is_plain_string(None, Untyped::Json));
    }
}
