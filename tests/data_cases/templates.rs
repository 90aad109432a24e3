//! Chat templates: the shared ChatML one and an HF-style one with namespace, loops, string methods.

use super::*;

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A template in the style of HF ones: namespace, loop variables, Python string methods, whitespace
/// control and `raise_exception`.
const FANCY: &str = r#"
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}
    {%- if not loop.first %}{{ raise_exception('system message must come first') }}{% endif -%}
    {%- set ns.system = m.content.strip() -%}
  {%- elif m.role == 'user' -%}
    {{ bos_token }}[USER] {% if ns.system %}({{ ns.system }}) {% endif %}{{ m.content | trim }}
  {%- elif m.role == 'assistant' -%}
    [BOT] {{ m['content'].strip() }}{{ eos_token }}
  {%- else -%}
    {{ raise_exception('unknown role: ' + m.role) }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}[BOT]{% endif -%}
"#;

fn template(src: &str) -> ChatTemplate {
    ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()), None).unwrap()
}

#[test]
fn chat_templates_render_the_trl_way() {
    let row = &load("conversational.jsonl").rows[0];
    let (Text::Messages(p), Text::Messages(c)) = (&row.prompt, &row.chosen) else { panic!("conversational row expected") };
    // TRL renders the prompt with the generation prompt and prompt + answer as a finished chat.
    let full = [p.as_slice(), c.as_slice()].concat();
    let chatml = template(CHATML);
    let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(chatml.render(p, true).unwrap(), prompt);
    assert_eq!(chatml.render(&full, false).unwrap(), format!("{prompt}Hello.<|im_end|>\n"));
    // The generation prompt "[BOT]" is shorter than a finished turn's "[BOT] ".
    let fancy = template(FANCY);
    assert_eq!(fancy.render(p, true).unwrap(), "<s>[USER] (Be brief.) Hi?[BOT]");
    assert_eq!(fancy.render(&full, false).unwrap(), "<s>[USER] (Be brief.) Hi?[BOT] Hello.</s>");
    let bad = [Message::new("user", "x"), Message::new("system", "y")];
    let err = template(FANCY).render(&bad, true).unwrap_err().to_string();
    assert!(err.contains("system message must come first"), "{err}");
    // A prompt ending with an assistant message is continued, not closed.
    let open = [Message::new("user", "Hi?"), Message::new("assistant", "Well,")];
    assert_eq!(template(CHATML).render_prompt(&open).unwrap(), "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nWell,");
    // tojson as Python's json.dumps: ", " / ": " separators, key order kept, no HTML escaping.
    let json = template("{{ messages | tojson }}|{{ messages[0] | tojson(indent=1) }}");
    let out = json.render(&[Message::new("user", "<a & b>")], false).unwrap();
    assert_eq!(out, "[{\"role\": \"user\", \"content\": \"<a & b>\"}]|{\n \"role\": \"user\",\n \"content\": \"<a & b>\"\n}");
    let loops = template("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.upper() }}{% endfor %}");
    assert_eq!(loops.render(&[Message::new("user", "a"), Message::new("user", "b")], false).unwrap(), "A");
}

#[test]
fn conversational_without_template_is_an_error() {
    let row = &load("conversational.jsonl").rows[0];
    let err = word_tokenizer().tokenize_all(std::slice::from_ref(row), &TruncationConfig::default()).unwrap_err();
    assert!(err.to_string().contains("row 0: conversational data needs a chat template"), "{err}");
}
