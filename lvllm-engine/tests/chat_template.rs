//! The real Qwen3 chat template against `transformers`' `apply_chat_template`
//! output, recorded in `fixtures/chat/cases.json` by `fixtures/gen_fixtures.py`.

use std::path::PathBuf;

use lvllm_engine::chat_template::{ChatTemplate, ChatTemplateError, ChatTemplateOptions};
use lvllm_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases() -> Value {
    serde_json::from_str(&read(fixtures().join("chat/cases.json"))).expect("cases.json parses")
}

fn qwen3_template() -> String {
    read(fixtures().join("chat/qwen3_chat_template.jinja"))
}

fn options(case: &Value) -> ChatTemplateOptions<'_> {
    ChatTemplateOptions {
        add_generation_prompt: case["add_generation_prompt"].as_bool().expect("add_generation_prompt"),
        tools: Some(&case["tools"]).filter(|t| !t.is_null()),
        extra: case["extra"].as_object().cloned().unwrap_or_default(),
    }
}

/// Renders every case and returns the names of those that differ from HF.
fn check_all(template: &ChatTemplate) -> Vec<String> {
    let cases = cases();
    let mut failures = Vec::new();
    for case in cases["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let got = template.apply(&case["messages"], &options(case));
        match (&case["expected"], got) {
            (Value::String(want), Ok(got)) if *want == got => {}
            (Value::Null, Err(ChatTemplateError::Render { .. })) => {}
            (want, got) => failures.push(format!("{name}:\n--- want\n{want}\n--- got\n{got:?}")),
        }
    }
    failures
}

#[test]
fn qwen3_template_matches_transformers() {
    let cases = cases();
    let bos = cases["bos_token"].as_str().map(str::to_owned);
    let eos = cases["eos_token"].as_str().map(str::to_owned);
    let template = ChatTemplate::new(&qwen3_template(), bos, eos).expect("template compiles");
    let failures = check_all(&template);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn template_from_tokenizer_config_list_uses_default() {
    // The tiny tokenizer's config lists {tool_use, default}; default is Qwen3's.
    let tok = Tokenizer::from_dir(&fixtures().join("tok")).expect("loads").expect("has tokenizer.json");
    let template = tok.chat_template().expect("has a chat template");
    let failures = check_all(template);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn rendered_prompt_tokenizes_with_special_tokens() {
    let tok = Tokenizer::from_dir(&fixtures().join("tok")).unwrap().unwrap();
    let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
    let opts = ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let prompt = tok.chat_template().unwrap().apply(&messages, &opts).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == im_start).count(), 2);
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
}
