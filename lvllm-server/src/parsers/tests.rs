//! Tests of the parsers with outputs in each family's real format, and the
//! streaming property: any split of the text gives the non-streaming result.

use serde_json::{json, Value};

use super::*;

const SEED: u64 = 0xabc;

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                           "metric": {"type": "boolean"}, "opts": {"type": "object"},
                           "ratio": {"type": "number"}, "tags": {"type": "array"}}}}}),
        json!({"type": "function", "function": {"name": "write_file", "parameters": {"type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}),
    ]
}

fn tool_parser(kind: ToolParserKind) -> ToolParser {
    ToolParser::new(kind, &tools()).with_id_seed(SEED)
}

/// Feeds `text` in the given chunk sizes (cycled) and gathers the result.
fn streamed(
    mut p: impl FnMut(&str) -> Vec<ParseEvent>,
    finish: impl FnOnce() -> Vec<ParseEvent>,
    text: &str,
    sizes: &[usize],
) -> ParsedOutput {
    let chars: Vec<char> = text.chars().collect();
    let mut events = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < chars.len() {
        let n = sizes[k % sizes.len()].max(1);
        k += 1;
        let chunk: String = chars[i..(i + n).min(chars.len())].iter().collect();
        events.extend(p(&chunk));
        i += n;
    }
    events.extend(finish());
    ParsedOutput::from_events(&events)
}

/// Checks that every way of streaming `text` gives the non-streaming result.
fn check_splits(make: &dyn Fn() -> OutputParser, text: &str) -> ParsedOutput {
    let whole = make().parse(text);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    // Every split in two.
    for &(pos, _) in &chars {
        let mut p = make();
        let mut ev = p.push(&text[..pos]);
        ev.extend(p.push(&text[pos..]));
        ev.extend(p.finish());
        assert_eq!(ParsedOutput::from_events(&ev), whole, "split at byte {pos} of {text:?}");
    }
    // One character at a time, and pseudo-random chunk sizes.
    let mut lcg = 12345u64;
    let random: Vec<usize> = (0..64)
        .map(|_| {
            lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (lcg >> 59) as usize + 1
        })
        .collect();
    for sizes in [&[1usize][..], &[2, 3, 5][..], &random[..]] {
        let p = std::cell::RefCell::new(make());
        let got = streamed(|d| p.borrow_mut().push(d), || p.borrow_mut().finish(), text, sizes);
        assert_eq!(got, whole, "chunks {sizes:?} of {text:?}");
    }
    whole
}

fn tools_only(kind: ToolParserKind) -> impl Fn() -> OutputParser {
    move || OutputParser::new(None, Some(tool_parser(kind)))
}

fn args(out: &ParsedOutput, i: usize) -> Value {
    serde_json::from_str(&out.tool_calls[i].function.arguments).expect("arguments are JSON")
}

// ---------------------------------------------------------------- qwen3_coder

#[test]
fn qwen3_coder_two_calls_with_text_before() {
    let text = "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n\
                <parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>\n\
                <tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/a.py\n</parameter>\n<parameter=content>\n\
                def f():\n    return \"</param\"\n\n</parameter>\n</function>\n</tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), text);
    assert_eq!(out.content.as_deref(), Some("Let me check.\n"));
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].function.name, "get_weather");
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"city": "Paris", "days": 3, "metric": true}"#);
    assert_eq!(out.tool_calls[0].kind, "function");
    assert_eq!(out.tool_calls[0].id, format!("call_{SEED:016x}{:08x}", 0));
    assert_eq!(out.tool_calls[1].id, format!("call_{SEED:016x}{:08x}", 1));
    assert_eq!(args(&out, 1), json!({"path": "/tmp/a.py", "content": "def f():\n    return \"</param\"\n"}));
}

#[test]
fn qwen3_coder_no_call_and_unknown_tool() {
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), "Just text, with a < and <tool but no call.");
    assert_eq!(out.content.as_deref(), Some("Just text, with a < and <tool but no call."));
    assert!(out.tool_calls.is_empty());
    // A tool the request did not declare: values stay strings.
    let text = "<tool_call>\n<function=search>\n<parameter=q>\n42\n</parameter>\n</function>\n</tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), text);
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"q": "42"}"#);
    assert_eq!(out.content, None);
}

#[test]
fn qwen3_coder_typed_values_and_unicode() {
    let text = "天气？<tool_call>\n<function=get_weather>\n<parameter=city>\n東京 🌸\n</parameter>\n\
                <parameter=opts>\n{\"unit\": \"°C\", \"n\": [1, 2]}\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n\
                <parameter=tags>\n[\"a\"]\n</parameter>\n<parameter=days>\nnull\n</parameter>\n</function>\n</tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), text);
    assert_eq!(out.content.as_deref(), Some("天气？"));
    assert_eq!(
        args(&out, 0),
        json!({"city": "東京 🌸", "opts": {"unit": "°C", "n": [1, 2]}, "ratio": 0.5, "tags": ["a"], "days": null})
    );
}

#[test]
fn qwen3_coder_malformed_and_unterminated() {
    // `<tool_call>` without `<function=` stays content.
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), "a <tool_call>hello</tool_call> b");
    assert_eq!(out.content.as_deref(), Some("a <tool_call>hello</tool_call> b"));
    assert!(out.tool_calls.is_empty());
    // A name with a space is not a call.
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), "<tool_call>\n<function=bad name>x");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.content.as_deref(), Some("<tool_call>\n<function=bad name>x"));
    // Cut off inside a value (token limit): the call is closed at the end.
    let text = "<tool_call>\n<function=write_file>\n<parameter=path>\n/a\n</parameter>\n<parameter=content>\nhel";
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), text);
    assert_eq!(args(&out, 0), json!({"path": "/a", "content": "hel"}));
    // Cut off inside the name: nothing was a call, the text is content.
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), "x<tool_call>\n<function=get_wea");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.content.as_deref(), Some("x<tool_call>\n<function=get_wea"));
    // Text after a call is content; whitespace right after it is dropped.
    let text = "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>\n\nDone.";
    let out = check_splits(&tools_only(ToolParserKind::Qwen3Coder), text);
    assert_eq!(out.tool_calls[0].function.arguments, "{}");
    assert_eq!(out.content.as_deref(), Some("Done."));
}

#[test]
fn qwen3_coder_streams_string_values_before_they_end() {
    let mut p = tool_parser(ToolParserKind::Qwen3Coder);
    let ev = p.push("<tool_call>\n<function=write_file>\n<parameter=content>\nline one\nline two");
    assert_eq!(
        ev,
        vec![
            ParseEvent::ToolCallStart { index: 0, id: format!("call_{SEED:016x}{:08x}", 0), name: "write_file".into() },
            ParseEvent::ToolCallArguments { index: 0, delta: "{\"content\": \"line one\\nline two".into() },
        ]
    );
    // A trailing newline is held back: it may be the one removed before `</parameter>`.
    assert_eq!(p.push("\n"), vec![]);
    assert_eq!(
        p.push("</parameter>\n</function>\n</tool_call>"),
        vec![ParseEvent::ToolCallArguments { index: 0, delta: "\"}".into() }]
    );
    // A partial marker is held back.
    let mut p = tool_parser(ToolParserKind::Qwen3Coder);
    assert_eq!(p.push("Hi <tool_c"), vec![ParseEvent::Content("Hi ".into())]);
    assert_eq!(p.push("ompass"), vec![ParseEvent::Content("<tool_compass".into())]);
}

// ---------------------------------------------------------------- glm45 / glm47

#[test]
fn glm45_and_glm47_formats() {
    let glm45 = "I'll look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n\
                 <arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>";
    let glm47 = "I'll look.\n<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value>\
                 <arg_key>days</arg_key><arg_value>2</arg_value></tool_call>";
    for kind in [ToolParserKind::Glm45, ToolParserKind::Glm47] {
        for text in [glm45, glm47] {
            let out = check_splits(&tools_only(kind), text);
            assert_eq!(out.content.as_deref(), Some("I'll look.\n"));
            assert_eq!(out.tool_calls.len(), 1);
            assert_eq!(out.tool_calls[0].function.name, "get_weather");
            assert_eq!(out.tool_calls[0].function.arguments, r#"{"city": "Beijing", "days": 2}"#);
        }
    }
}

#[test]
fn glm_values_zero_args_and_several_calls() {
    let text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value> New York </arg_value>\n\
                <arg_key>opts</arg_key>\n<arg_value>{\"a\": true}</arg_value>\n</tool_call>\n\
                <tool_call>list_files</tool_call>\
                <tool_call>unknown\n<arg_key>n</arg_key>\n<arg_value>7</arg_value>\n<arg_key>s</arg_key>\n<arg_value>hi there</arg_value>\n</tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::Glm47), text);
    assert_eq!(out.tool_calls.len(), 3);
    // A string-typed value keeps its spaces (vLLM does not strip strings).
    assert_eq!(args(&out, 0), json!({"city": " New York ", "opts": {"a": true}}));
    assert_eq!(out.tool_calls[1].function.name, "list_files");
    assert_eq!(out.tool_calls[1].function.arguments, "{}");
    // Undeclared tool: JSON where it parses, strings otherwise.
    assert_eq!(args(&out, 2), json!({"n": 7, "s": "hi there"}));
    assert_eq!(out.content, None);
}

#[test]
fn glm_malformed() {
    let out = check_splits(&tools_only(ToolParserKind::Glm45), "see <tool_call> <arg_key>x</arg_key>");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.content.as_deref(), Some("see <tool_call> <arg_key>x</arg_key>"));
    // Unterminated call: closed at the end.
    let out = check_splits(
        &tools_only(ToolParserKind::Glm45),
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Ro",
    );
    assert_eq!(args(&out, 0), json!({"city": "Ro"}));
}

// ---------------------------------------------------------------- minimax_m2

#[test]
fn minimax_m2_block_with_two_invokes() {
    let text = "Checking both.\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Paris</parameter>\n\
                <parameter name=\"days\">\n 5 \n</parameter>\n</invoke>\n<invoke name=\"write_file\">\n\
                <parameter name=\"path\">/tmp/x</parameter>\n<parameter name=\"content\">  ünïcödé  </parameter>\n</invoke>\n\
                </minimax:tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::MinimaxM2), text);
    assert_eq!(out.content.as_deref(), Some("Checking both.\n"));
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"city": "Paris", "days": 5}"#);
    assert_eq!(args(&out, 1), json!({"path": "/tmp/x", "content": "ünïcödé"}));
}

#[test]
fn minimax_m2_no_call_and_unterminated() {
    let out = check_splits(&tools_only(ToolParserKind::MinimaxM2), "<think>hmm</think>\n\nHello <minimax:tool");
    assert_eq!(out.content.as_deref(), Some("<think>hmm</think>\n\nHello <minimax:tool"));
    let text = "<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"metric\">false</parameter>\n<parameter name=\"ci";
    let out = check_splits(&tools_only(ToolParserKind::MinimaxM2), text);
    assert_eq!(args(&out, 0), json!({"metric": false}));
}

// ---------------------------------------------------------------- hermes

#[test]
fn hermes_calls_as_the_qwen3_template_renders_them() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>\n\
                <tool_call>\n{\"name\": \"write_file\", \"arguments\": \"{\\\"path\\\": \\\"/t\\\"}\"}\n</tool_call>";
    let out = check_splits(&tools_only(ToolParserKind::Hermes), text);
    assert_eq!(out.content.as_deref(), Some("Let me check.\n"));
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].function.name, "get_weather");
    assert_eq!(args(&out, 0), json!({"city": "Paris", "days": 3}));
    assert_eq!(out.tool_calls[1].function.name, "write_file");
    assert_eq!(args(&out, 1), json!({"path": "/t"}));
    assert!(out.tool_calls[0].id.starts_with("call_"));
}

#[test]
fn hermes_malformed_unterminated_and_unicode() {
    // Not a call: stays content, markers and all.
    let out = check_splits(&tools_only(ToolParserKind::Hermes), "a <tool_call>{\"x\": 1}</tool_call> b");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.content.as_deref(), Some("a <tool_call>{\"x\": 1}</tool_call> b"));
    // Cut off before the closing marker, but the JSON is complete: a call.
    let out = check_splits(
        &tools_only(ToolParserKind::Hermes),
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"東京\"}}",
    );
    assert_eq!(out.tool_calls.len(), 1);
    assert_eq!(args(&out, 0), json!({"city": "東京"}));
    // Cut off mid-JSON: content.
    let out = check_splits(&tools_only(ToolParserKind::Hermes), "<tool_call>{\"name\": \"get_w");
    assert!(out.tool_calls.is_empty());
    assert_eq!(out.content.as_deref(), Some("<tool_call>{\"name\": \"get_w"));
}

// ---------------------------------------------------------------- kimi_k2

#[test]
fn kimi_k2_section() {
    let text = "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>\
                {\"city\": \"Paris\", \"days\": 3} <|tool_call_end|><|tool_call_begin|> functions.write_file:1 \
                <|tool_call_argument_begin|>{\"path\": \"/t\", \"content\": \"x<|y\"}<|tool_call_end|><|tool_calls_section_end|>";
    let out = check_splits(&tools_only(ToolParserKind::KimiK2), text);
    assert_eq!(out.content.as_deref(), Some("Sure."));
    assert_eq!(out.tool_calls.len(), 2);
    assert_eq!(out.tool_calls[0].id, "functions.get_weather:0");
    assert_eq!(out.tool_calls[0].function.name, "get_weather");
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"city": "Paris", "days": 3}"#);
    assert_eq!(out.tool_calls[1].id, "functions.write_file:1");
    assert_eq!(args(&out, 1), json!({"path": "/t", "content": "x<|y"}));
}

#[test]
fn kimi_k2_singular_variant_no_call_and_trailing_text() {
    let text =
        "<|tool_call_section_begin|><|tool_call_begin|>functions.list:0<|tool_call_argument_begin|><|tool_call_end|>\
                <|tool_call_section_end|>\nAfter.";
    let out = check_splits(&tools_only(ToolParserKind::KimiK2), text);
    assert_eq!(out.tool_calls[0].function.arguments, "{}");
    assert_eq!(out.content.as_deref(), Some("After."));
    let out = check_splits(&tools_only(ToolParserKind::KimiK2), "no <|tool calls here");
    assert_eq!(out.content.as_deref(), Some("no <|tool calls here"));
}

// ---------------------------------------------------------------- reasoning

fn reasoning_only(kind: ReasoningParserKind, start: ReasoningStart) -> impl Fn() -> OutputParser {
    move || OutputParser::new(Some(ReasoningParser::new(kind, start)), None)
}

fn split(kind: ReasoningParserKind, start: ReasoningStart, text: &str) -> (Option<String>, Option<String>) {
    let out = check_splits(&reasoning_only(kind, start), text);
    assert_eq!(ReasoningParser::new(kind, start).parse(text), (out.reasoning_content.clone(), out.content.clone()));
    (out.reasoning_content, out.content)
}

fn s(x: &str) -> Option<String> {
    Some(x.to_string())
}

#[test]
fn qwen3_reasoning() {
    use ReasoningParserKind::Qwen3;
    use ReasoningStart::*;
    assert_eq!(
        split(Qwen3, Auto, "<think>\nLet me think.\n</think>\n\nAnswer."),
        (s("\nLet me think.\n"), s("Answer."))
    );
    // The template opened `<think>`: only `</think>` in the output.
    assert_eq!(split(Qwen3, InReasoning, "Hmm.</think>Answer"), (s("Hmm."), s("Answer")));
    assert_eq!(split(Qwen3, Auto, "Hmm.</think>Answer"), (s("Hmm."), s("Answer")));
    // Truncated: everything is reasoning.
    assert_eq!(split(Qwen3, Auto, "<think>still thinking"), (s("still thinking"), None));
    // Thinking disabled by the template.
    assert_eq!(split(Qwen3, InContent, "Plain answer"), (None, s("Plain answer")));
    // A tool call ends reasoning implicitly; a mention of `<tool_call>` does not.
    assert_eq!(
        split(Qwen3, Auto, "use <tool_call> maybe\n<tool_call>\n<function=f>"),
        (s("use <tool_call> maybe\n"), s("<tool_call>\n<function=f>"))
    );
    assert_eq!(split(Qwen3, Auto, "a <tool_call>"), (s("a <tool_call>"), None));
}

#[test]
fn other_reasoning_families() {
    use ReasoningParserKind::*;
    use ReasoningStart::*;
    for k in [DeepseekR1, MinimaxM2, KimiK2] {
        assert_eq!(split(k, Auto, "<think>r</think>c"), (s("r"), s("c")));
        assert_eq!(split(k, Auto, "r </think> c"), (s("r "), s("c")));
        assert_eq!(split(k, Auto, "only reasoning"), (s("only reasoning"), None));
    }
    // GLM: reasoning only when the output opens `<think>` (or the prompt did).
    assert_eq!(split(Glm45, Auto, "<think>r</think>\nc"), (s("r"), s("c")));
    assert_eq!(split(Glm45, Auto, "no think here</think>"), (None, s("no think here</think>")));
    assert_eq!(split(Glm45, InReasoning, "r</think>c"), (s("r"), s("c")));
    // MiniMax append-think: nothing is split, `<think>` is prepended.
    assert_eq!(split(MinimaxM2AppendThink, Auto, "r</think>\n\nc"), (None, s("<think>r</think>\n\nc")));
    // Kimi: a tool-call section ends reasoning.
    assert_eq!(split(KimiK2, Auto, "r<|tool_calls_section_begin|>x"), (s("r"), s("<|tool_calls_section_begin|>x")));
    assert_eq!(split(DeepseekR1, Auto, "思考</think>答案"), (s("思考"), s("答案")));
}

#[test]
fn reasoning_start_from_prompt() {
    assert_eq!(ReasoningStart::from_prompt("<|im_start|>assistant\n<think>\n"), ReasoningStart::InReasoning);
    assert_eq!(
        ReasoningStart::from_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ReasoningStart::InContent
    );
    assert_eq!(ReasoningStart::from_prompt("<|assistant|>"), ReasoningStart::Auto);
}

// ---------------------------------------------------------------- chained

#[test]
fn reasoning_then_tool_calls() {
    let make = || {
        OutputParser::new(
            Some(ReasoningParser::new(ReasoningParserKind::Qwen3, ReasoningStart::InReasoning)),
            Some(tool_parser(ToolParserKind::Qwen3Coder)),
        )
    };
    let text = "The user wants weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n\
                </parameter>\n</function>\n</tool_call>";
    let out = check_splits(&make, text);
    assert_eq!(out.reasoning_content.as_deref(), Some("The user wants weather.\n"));
    assert_eq!(out.content, None);
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"city": "Paris"}"#);

    let make = || {
        OutputParser::new(
            Some(ReasoningParser::new(ReasoningParserKind::MinimaxM2AppendThink, ReasoningStart::Auto)),
            Some(tool_parser(ToolParserKind::MinimaxM2)),
        )
    };
    let text =
        "plan</think>\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">Oslo</parameter>\n\
                </invoke>\n</minimax:tool_call>";
    let out = check_splits(&make, text);
    assert_eq!(out.content.as_deref(), Some("<think>plan</think>\n"));
    assert_eq!(args(&out, 0), json!({"city": "Oslo"}));

    let make = || {
        OutputParser::new(
            Some(ReasoningParser::new(ReasoningParserKind::KimiK2, ReasoningStart::Auto)),
            Some(tool_parser(ToolParserKind::KimiK2)),
        )
    };
    let text = "<think>need tool<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0\
                <|tool_call_argument_begin|>{\"city\":\"Rome\"}<|tool_call_end|><|tool_calls_section_end|>";
    let out = check_splits(&make, text);
    assert_eq!(out.reasoning_content.as_deref(), Some("need tool"));
    assert_eq!(out.tool_calls[0].function.arguments, r#"{"city":"Rome"}"#);
}

#[test]
fn glm47_thinking_prompt_then_tool_call() {
    // GLM-4.7's template ends the prompt with `<|assistant|><think>`.
    let start = ReasoningStart::from_prompt("[gMASK]<sop><|user|>weather?<|assistant|><think>");
    assert_eq!(start, ReasoningStart::InReasoning);
    let make = move || {
        OutputParser::new(
            Some(ReasoningParser::new(ReasoningParserKind::Glm45, start)),
            Some(tool_parser(ToolParserKind::Glm47)),
        )
    };
    let text =
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Xi'an</arg_value></tool_call>";
    let out = check_splits(&make, text);
    assert_eq!(out.reasoning_content.as_deref(), Some("Need the tool."));
    assert_eq!(out.content, None);
    assert_eq!(args(&out, 0), json!({"city": "Xi'an"}));
}

#[test]
fn names_and_errors() {
    assert_eq!(ToolParserKind::from_name("qwen3_coder"), Ok(ToolParserKind::Qwen3Coder));
    assert_eq!(ToolParserKind::from_name("GLM47"), Ok(ToolParserKind::Glm47));
    assert_eq!(ToolParserKind::from_name("minimax-m2"), Ok(ToolParserKind::MinimaxM2));
    assert_eq!(ToolParserKind::from_name("hermes"), Ok(ToolParserKind::Hermes));
    let e = ToolParser::by_name("pythonic", &[]).map(|_| ()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown tool-call parser `pythonic`; supported: qwen3_coder, glm45, glm47, minimax_m2, kimi_k2, hermes"
    );
    let e = ReasoningParserKind::from_name("step3p5").unwrap_err();
    assert!(e.to_string().contains("minimax_m2_append_think"), "{e}");
    for (name, k) in ReasoningParserKind::ALL {
        assert_eq!(k.name(), name);
    }
    for (name, k) in ToolParserKind::ALL {
        assert_eq!(k.name(), name);
    }
}

#[test]
fn tool_call_serializes_as_openai() {
    let out = tool_parser(ToolParserKind::Glm45)
        .parse("<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>");
    let v = serde_json::to_value(&out.tool_calls[0]).expect("serializable");
    assert_eq!(
        v,
        json!({"id": format!("call_{SEED:016x}{:08x}", 0), "type": "function",
                         "function": {"name": "f", "arguments": "{\"a\": 1}"}})
    );
    // Random ids differ between parsers.
    let a = ToolParser::new(ToolParserKind::Glm45, &[]).parse("<tool_call>f</tool_call>");
    let b = ToolParser::new(ToolParserKind::Glm45, &[]).parse("<tool_call>f</tool_call>");
    assert_ne!(a.tool_calls[0].id, b.tool_calls[0].id);
    assert!(a.tool_calls[0].id.starts_with("call_"));
}

#[test]
fn no_parsers_is_all_content() {
    let out = check_splits(&|| OutputParser::new(None, None), "<think>x</think> <tool_call>");
    assert_eq!(out.content.as_deref(), Some("<think>x</think> <tool_call>"));
}

/// Random texts made of marker pieces: every parser must give the same result
/// for every split, whatever the text (malformed ones included).
#[test]
fn random_marker_soup_streams_like_whole() {
    const PIECES: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<function=get_weather>",
        "<function=",
        "</function>",
        "<parameter=city>",
        "<parameter=days>",
        "</parameter>",
        "<arg_key>",
        "city",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "<minimax:tool_call>",
        "</minimax:tool_call>",
        "<invoke name=\"get_weather\">",
        "</invoke>",
        "<parameter name=\"days\">",
        "<|tool_calls_section_begin|>",
        "<|tool_call_begin|>",
        "functions.f:0",
        "<|tool_call_argument_begin|>",
        "{\"a\": 1}",
        "<|tool_call_end|>",
        "<|tool_calls_section_end|>",
        "<think>",
        "</think>",
        "\n",
        " ",
        "<",
        ">",
        "x",
        "7",
        "é",
        "🌸",
        "null",
        "get_weather",
    ];
    let mut lcg = 99u64;
    let mut next = |n: usize| {
        lcg = lcg.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (lcg >> 33) as usize % n
    };
    let reasoning_kinds = ReasoningParserKind::ALL;
    for round in 0..120 {
        let len = 1 + next(24);
        let text: String = (0..len).map(|_| PIECES[next(PIECES.len())]).collect();
        let (_, tool_kind) = ToolParserKind::ALL[round % ToolParserKind::ALL.len()];
        let (_, r_kind) = reasoning_kinds[round % reasoning_kinds.len()];
        let start = [ReasoningStart::Auto, ReasoningStart::InReasoning, ReasoningStart::InContent][round % 3];
        check_splits(&tools_only(tool_kind), &text);
        check_splits(&reasoning_only(r_kind, start), &text);
        let make = move || OutputParser::new(Some(ReasoningParser::new(r_kind, start)), Some(tool_parser(tool_kind)));
        let out = check_splits(&make, &text);
        for call in &out.tool_calls {
            if tool_kind != ToolParserKind::KimiK2 {
                // Built arguments are always valid JSON objects (Kimi's are the model's text).
                let v: Value = serde_json::from_str(&call.function.arguments)
                    .unwrap_or_else(|e| panic!("{e}: {:?} from {text:?}", call.function.arguments));
                assert!(v.is_object());
            }
        }
    }
}
