//! Text ↔ token ids for Hugging Face models, plus streaming detokenization.
//!
//! The module has three axes, each in one place:
//!
//! * **Loading** ([`Tokenizer::from_bytes`], [`Tokenizer::from_dir`]): the
//!   files of a HF model directory. `tokenizer.json` drives encoding and
//!   decoding through the `tokenizers` crate (pure Rust, `fancy-regex`);
//!   `tokenizer_config.json` supplies `bos_token`, `eos_token` and the chat
//!   template; `generation_config.json` supplies more end-of-sequence ids; a
//!   `chat_template.jinja` file wins over the config's `chat_template`
//!   (the transformers 4.43+ convention).
//! * **Encoding and decoding** ([`Tokenizer::encode`], [`Tokenizer::decode`]):
//!   the same ids and text as `transformers`' fast tokenizers. Like
//!   transformers 5, `clean_up_tokenization_spaces` is honoured only for
//!   non-BPE models.
//! * **Streaming** ([`IncrementalDecoder`]): ids in one at a time, text out,
//!   never a partial UTF-8 character.
//!
//! This module depends on no engine module but [`crate::chat_template`].

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::chat_template::{ChatTemplate, ChatTemplateError};

/// How many already-emitted ids an [`IncrementalDecoder`] seeded with context
/// keeps as its decoding window, as vLLM does: enough for the decoder to see
/// the neighbours that decide spacing (SentencePiece's leading `▁`).
const INITIAL_CONTEXT_IDS: usize = 5;

/// Errors from loading a tokenizer, encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.json` could not be parsed by the `tokenizers` crate.
    #[error("cannot load {what}: {source}")]
    Load {
        /// Which input failed, e.g. `"tokenizer.json"`.
        what: String,
        /// The parser's error.
        #[source]
        source: tokenizers::Error,
    },
    /// A JSON config file is not valid JSON.
    #[error("cannot parse {what}: {source}")]
    ConfigJson {
        /// Which file, e.g. `"tokenizer_config.json"`.
        what: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON config file holds a field of an unexpected shape.
    #[error("invalid {field} in {what}: {reason}")]
    InvalidConfig {
        /// Which file.
        what: String,
        /// Which field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A config names a token that the vocabulary does not contain.
    #[error("{what} names the token {token:?}, which is not in the vocabulary")]
    UnknownToken {
        /// Which file and field named it.
        what: String,
        /// The token.
        token: String,
    },
    /// Encoding failed.
    #[error("cannot encode text: {source}")]
    Encode {
        /// The tokenizer's error.
        #[source]
        source: tokenizers::Error,
    },
    /// Decoding failed (for example, an id outside the vocabulary).
    #[error("cannot decode ids: {source}")]
    Decode {
        /// The tokenizer's error.
        #[source]
        source: tokenizers::Error,
    },
    /// The chat template failed to compile or render.
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

/// A Hugging Face tokenizer with its special tokens and chat template.
/// `Send + Sync`: share one instance between requests.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    clean_up_tokenization_spaces: bool,
    /// The special tokens a chat template sees as `bos_token` / `eos_token`.
    template_tokens: (Option<String>, Option<String>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("chat_template", &self.chat_template)
            .finish_non_exhaustive()
    }
}

/// The parts of `tokenizer_config.json` that the engine uses.
#[derive(Debug, Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    clean_up_tokenization_spaces: bool,
}

const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const GENERATION_CONFIG: &str = "generation_config.json";

fn parse_json(what: &str, bytes: &[u8]) -> Result<Json, TokenizerError> {
    serde_json::from_slice(bytes).map_err(|source| TokenizerError::ConfigJson { what: what.to_owned(), source })
}

fn invalid(what: &str, field: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidConfig { what: what.to_owned(), field: field.to_owned(), reason: reason.into() }
}

/// A special token given as a string, as `{"content": ...}` (an
/// `AddedToken`), or as null.
fn special_token(config: &Json, field: &str) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(obj)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(TOKENIZER_CONFIG, field, "an object without a string `content`")),
        },
        Some(_) => Err(invalid(TOKENIZER_CONFIG, field, "expected a string, an object or null")),
    }
}

/// `chat_template` given as a string, or as a list of `{name, template}`
/// (the one named "default" is used, else the first).
fn config_chat_template(config: &Json) -> Result<Option<String>, TokenizerError> {
    let field = "chat_template";
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut named = Vec::with_capacity(list.len());
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some(name), Some(template)) => named.push((name, template)),
                    _ => {
                        return Err(invalid(
                            TOKENIZER_CONFIG,
                            field,
                            "a list entry without string `name` and `template`",
                        ))
                    }
                }
            }
            Ok(named
                .iter()
                .find(|(name, _)| *name == "default")
                .or(named.first())
                .map(|(_, template)| (*template).to_owned()))
        }
        Some(_) => Err(invalid(TOKENIZER_CONFIG, field, "expected a string or a list of {name, template}")),
    }
}

fn parse_tokenizer_config(bytes: &[u8]) -> Result<TokenizerConfig, TokenizerError> {
    let config = parse_json(TOKENIZER_CONFIG, bytes)?;
    if !config.is_object() {
        return Err(invalid(TOKENIZER_CONFIG, "<root>", "expected a JSON object"));
    }
    let clean_up_tokenization_spaces = match config.get("clean_up_tokenization_spaces") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return Err(invalid(TOKENIZER_CONFIG, "clean_up_tokenization_spaces", "expected a bool")),
    };
    Ok(TokenizerConfig {
        bos_token: special_token(&config, "bos_token")?,
        eos_token: special_token(&config, "eos_token")?,
        chat_template: config_chat_template(&config)?,
        clean_up_tokenization_spaces,
    })
}

/// `eos_token_id` of `generation_config.json`: an int, a list of ints, or
/// absent.
fn generation_eos_ids(bytes: &[u8]) -> Result<Vec<u32>, TokenizerError> {
    let config = parse_json(GENERATION_CONFIG, bytes)?;
    let field = "eos_token_id";
    let as_id = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| invalid(GENERATION_CONFIG, field, format!("{v} is not a token id")))
    };
    match config.get(field) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(ids)) => ids.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

/// Reads `dir/name`; `Ok(None)` when the file does not exist.
fn read_optional(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, TokenizerError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path, source }),
    }
}

impl Tokenizer {
    /// Builds a tokenizer from in-memory file contents (the bundled model is
    /// embedded in the binary). Only `tokenizer_json` is required.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        generation_config_json: Option<&[u8]>,
        chat_template_jinja: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|source| TokenizerError::Load { what: "tokenizer.json".to_owned(), source })?;
        let config = match tokenizer_config_json {
            Some(bytes) => parse_tokenizer_config(bytes)?,
            None => TokenizerConfig::default(),
        };

        let mut eos_token_ids = Vec::new();
        if let Some(eos) = &config.eos_token {
            let id = inner.token_to_id(eos).ok_or_else(|| TokenizerError::UnknownToken {
                what: format!("{TOKENIZER_CONFIG} eos_token"),
                token: eos.clone(),
            })?;
            eos_token_ids.push(id);
        }
        if let Some(bytes) = generation_config_json {
            for id in generation_eos_ids(bytes)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        let template_source = chat_template_jinja.map(str::to_owned).or(config.chat_template);
        let template_tokens = (config.bos_token.clone(), config.eos_token.clone());
        let chat_template = template_source
            .map(|source| ChatTemplate::new(&source, template_tokens.0.clone(), template_tokens.1.clone()))
            .transpose()?;

        // Measured once: the crate rebuilds the whole vocabulary map to count it.
        let vocab_size = inner.get_vocab_size(true);
        let clean_up_tokenization_spaces =
            config.clean_up_tokenization_spaces && !matches!(inner.get_model(), tokenizers::ModelWrapper::BPE(_));
        Ok(Self { inner, vocab_size, eos_token_ids, chat_template, clean_up_tokenization_spaces, template_tokens })
    }

    /// Reads `tokenizer.json`, `tokenizer_config.json`,
    /// `generation_config.json` and `chat_template.jinja` from a HF model
    /// directory. `Ok(None)` when there is no `tokenizer.json`; the other
    /// files are optional.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        let Some(tokenizer_json) = read_optional(dir, "tokenizer.json")? else {
            return Ok(None);
        };
        let tokenizer_config = read_optional(dir, TOKENIZER_CONFIG)?;
        let generation_config = read_optional(dir, GENERATION_CONFIG)?;
        let template_name = "chat_template.jinja";
        let chat_template = match read_optional(dir, template_name)? {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|e| TokenizerError::Io {
                path: dir.join(template_name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?),
            None => None,
        };
        Self::from_bytes(
            &tokenizer_json,
            tokenizer_config.as_deref(),
            generation_config.as_deref(),
            chat_template.as_deref(),
        )
        .map(Some)
    }

    /// Encodes `text`. Special tokens written in the text (e.g.
    /// `<|im_start|>`) become their ids; `add_special_tokens` runs the
    /// tokenizer's post-processor (e.g. a BOS id for Llama-style tokenizers),
    /// as HF's `encode(add_special_tokens=...)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner.encode_fast(text, add_special_tokens).map_err(|source| TokenizerError::Encode { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes `ids` to text, dropping special tokens when
    /// `skip_special_tokens` is set. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(|source| TokenizerError::Decode { source })?;
        Ok(if self.clean_up_tokenization_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// The number of tokens, added tokens included (HF's `len(tokenizer)`).
    /// The model's embedding may have more rows (padding for alignment).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of `token` (a vocabulary entry or an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id` (byte-level tokens are returned as stored,
    /// e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// End-of-sequence ids: `tokenizer_config.json`'s `eos_token` followed by
    /// `generation_config.json`'s `eos_token_id` (an int or a list), without
    /// duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The chat template, if the model ships one (or one was set).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replaces the model's chat template with `source` (Jinja, compiled with
    /// HF's settings and this tokenizer's `bos_token` / `eos_token`).
    pub fn with_chat_template(mut self, source: &str) -> Result<Self, TokenizerError> {
        let (bos, eos) = self.template_tokens.clone();
        self.chat_template = Some(ChatTemplate::new(source, bos, eos)?);
        Ok(self)
    }

    /// A streaming decoder for a fresh sequence of generated ids.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder { tokenizer: self, skip_special_tokens, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// A streaming decoder whose output continues `context` (usually the
    /// prompt): the last few context ids decide the spacing of the first
    /// generated token (SentencePiece tokenizers drop the leading space of a
    /// sequence's first word), but their text is not emitted.
    pub fn incremental_decoder_after(&self, context: &[u32], skip_special_tokens: bool) -> IncrementalDecoder<'_> {
        let ids = context[context.len().saturating_sub(INITIAL_CONTEXT_IDS)..].to_vec();
        let read_offset = ids.len();
        IncrementalDecoder { tokenizer: self, skip_special_tokens, ids, prefix_offset: 0, read_offset }
    }
}

/// transformers' `clean_up_tokenization`: removes the spaces WordPiece-style
/// decoders put before punctuation and contractions.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Streaming detokenizer: push ids one at a time and get the newly completed
/// text. It never emits a partial UTF-8 character: text ending in U+FFFD is
/// held back until more ids arrive (the prefix-offset method of vLLM and HF's
/// `TextStreamer`). [`finish`](Self::finish) flushes what is held back.
///
/// Concatenating every `push` and the final `finish` gives
/// `decode(all ids)`.
#[derive(Debug)]
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The ids of the decoding window and after: `ids[prefix_offset..]`.
    ids: Vec<u32>,
    /// Start of the window whose text has already been emitted.
    prefix_offset: usize,
    /// End of the already-emitted ids.
    read_offset: usize,
}

impl IncrementalDecoder<'_> {
    /// Adds one id and returns the text it completes (often empty while a
    /// multi-byte character is split across byte-level tokens).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        self.emit(false)
    }

    /// Returns the text still held back (e.g. a trailing incomplete
    /// character, as U+FFFD) and resets the window to the end.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        self.emit(true)
    }

    fn emit(&mut self, flush: bool) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let tok = self.tokenizer;
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let complete = flush || !new_text.ends_with('\u{FFFD}');
        if !complete || new_text.len() <= prefix_text.len() {
            if flush {
                self.advance();
            }
            return Ok(String::new());
        }
        match new_text.get(prefix_text.len()..) {
            Some(delta) if new_text.starts_with(prefix_text.as_str()) => {
                let delta = delta.to_owned();
                self.advance();
                Ok(delta)
            }
            // The window's text changed in a way that does not extend the
            // emitted prefix (only possible mid-character): wait for more ids.
            _ if !flush => Ok(String::new()),
            _ => {
                self.advance();
                Ok(String::new())
            }
        }
    }

    /// Moves the window past everything pushed so far, dropping ids that no
    /// later decode needs.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn special_token_shapes() {
        let config: Json = serde_json::json!({
            "a": "<s>", "b": {"content": "</s>", "lstrip": false}, "c": null, "d": 3, "e": {"x": 1}
        });
        assert_eq!(special_token(&config, "a").unwrap().as_deref(), Some("<s>"));
        assert_eq!(special_token(&config, "b").unwrap().as_deref(), Some("</s>"));
        assert_eq!(special_token(&config, "c").unwrap(), None);
        assert_eq!(special_token(&config, "missing").unwrap(), None);
        assert!(special_token(&config, "d").is_err());
        assert!(special_token(&config, "e").is_err());
    }

    #[test]
    fn chat_template_shapes() {
        let list = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}
        ]});
        assert_eq!(config_chat_template(&list).unwrap().as_deref(), Some("D"));
        let first = serde_json::json!({"chat_template": [{"name": "rag", "template": "R"}]});
        assert_eq!(config_chat_template(&first).unwrap().as_deref(), Some("R"));
        let plain = serde_json::json!({"chat_template": "P"});
        assert_eq!(config_chat_template(&plain).unwrap().as_deref(), Some("P"));
        assert!(config_chat_template(&serde_json::json!({"chat_template": 1})).is_err());
        assert!(config_chat_template(&serde_json::json!({"chat_template": [{"name": "x"}]})).is_err());
    }

    #[test]
    fn generation_eos_shapes() {
        assert_eq!(generation_eos_ids(br#"{"eos_token_id": 7}"#).unwrap(), vec![7]);
        assert_eq!(generation_eos_ids(br#"{"eos_token_id": [7, 9]}"#).unwrap(), vec![7, 9]);
        assert!(generation_eos_ids(br#"{}"#).unwrap().is_empty());
        assert!(generation_eos_ids(br#"{"eos_token_id": -1}"#).is_err());
        assert!(generation_eos_ids(br#"{"eos_token_id": "x"}"#).is_err());
        assert!(generation_eos_ids(b"not json").is_err());
    }

    #[test]
    fn bad_tokenizer_json_is_an_error() {
        let err = Tokenizer::from_bytes(b"{}", None, None, None).unwrap_err();
        assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(clean_up_tokenization("a , b . I do n't"), "a, b. I don't");
    }
}
