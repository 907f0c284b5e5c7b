//! The prompt estimate against the providers' tokenizers: OpenAI's o200k (gpt-4o and later) and
//! cl100k (gpt-4, gpt-3.5), counted exactly with `tiktoken-rs`, and Anthropic's published
//! ratio for English (about 3.5 characters a token), on a corpus of English, code, German,
//! Chinese, Japanese and emoji (`tests/corpus/`). A reservation must never undercount real
//! tokens by more than 10% on any of them: a budget could then be overrun by that much.

use llm_policy_core::tokens::estimate;

const CORPUS: &[(&str, &str)] = &[
    ("english", include_str!("corpus/english.txt")),
    ("code", include_str!("corpus/code.txt")),
    ("german", include_str!("corpus/german.txt")),
    ("chinese", include_str!("corpus/chinese.txt")),
    ("japanese", include_str!("corpus/japanese.txt")),
    ("emoji", include_str!("corpus/emoji.txt")),
];

#[test]
fn the_estimate_never_undercounts_by_more_than_ten_percent() {
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    let mut report =
        String::from("text      chars  bytes/4  estimate  o200k  cl100k  est/o200k  est/cl100k\n");
    let mut worst: f64 = f64::MAX;
    for (name, text) in CORPUS {
        let est = estimate(text) as f64;
        let a = o200k.encode_ordinary(text).len() as f64;
        let b = cl100k.encode_ordinary(text).len() as f64;
        let bytes = text.len().div_ceil(4);
        report.push_str(&format!(
            "{name:9} {:5}  {bytes:7}  {est:8}  {a:5}  {b:6}  {:9.2}  {:10.2}\n",
            text.chars().count(),
            est / a,
            est / b
        ));
        worst = worst.min(est / a).min(est / b);
    }
    println!("{report}worst ratio {worst:.2}");
    assert!(worst >= 0.9, "{report}");
    // Anthropic: about 3.5 characters of English a token.
    let english = CORPUS[0].1;
    assert!(estimate(english) as f64 >= 0.9 * english.chars().count() as f64 / 3.5);
}
