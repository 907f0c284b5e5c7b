//! Tests of CEL compilation: translation, load-time checks, limits, and the differential
//! property test of the native tree against the interpreter.
use super::*;
use crate::diagnostic::Code;

fn attrs() -> Vec<String> {
    ["id", "tier", "team"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn common_expressions_are_translated() {
    for src in [
        "request.model == 'gpt-4o' && request.max_tokens > 100",
        "!(request.model in ['a', 'b'])",
        "principal.tier == 'free' || request.stream",
        "request.prompt.contains('ignore previous')",
        "request.prompt.matches('(?i)sk-[a-z0-9]{20}')",
        "'x-api-key' in request.headers",
        "has(shield.pii)",
        "shield.pii > 0.5",
        "'web_search' in request.tools",
        "1000 < request.max_tokens",
        "size(request.messages) > 40",
        "request.prompt.size() <= 10",
        "request.messages.exists(m, m.role == 'tool' && size(m.content) > 20000)",
        "request.tools.all(t, t in ['a', 'b'])",
    ] {
        let c = compile(src, &attrs()).unwrap();
        assert!(c.native, "{src}");
    }
}

#[test]
fn others_use_the_interpreter_with_an_index_hint() {
    let c = compile(
        "request.model == 'x' && request.prompt.lowerAscii() == 'y'",
        &attrs(),
    )
    .unwrap();
    assert!(!c.native);
    assert!(c.index_hint.is_some());
}

#[test]
fn load_time_errors() {
    let e = compile("request.modle == 'x'", &attrs()).err().unwrap();
    assert_eq!(e.code, Code::UnknownField);
    assert_eq!(e.help.as_deref(), Some("did you mean `request.model`?"));
    assert_eq!(
        compile("reqest.model == 'x'", &attrs()).err().unwrap().code,
        "unknown-field"
    );
    assert_eq!(
        compile("request.model ==", &attrs()).err().unwrap().code,
        "cel-syntax"
    );
    assert_eq!(
        compile("request.prompt.lowerAsci() == 'x'", &attrs())
            .err()
            .unwrap()
            .code,
        "cel-unknown-function"
    );
    let deep = format!("{}true{}", "(".repeat(5000), ")".repeat(5000));
    assert_eq!(
        compile(&deep, &attrs()).err().unwrap().code,
        Code::CelTooDeep
    );
    let bangs = format!("{}true", "!".repeat(5000));
    assert_eq!(
        compile(&bangs, &attrs()).err().unwrap().code,
        "cel-too-deep"
    );
    assert!(compile("[1,2].all(x, x > 0) && request.stream", &attrs()).is_ok());
}

mod differential {
    //! The native translation must decide exactly as the `cel` interpreter on every context, and
    //! a comparison the checker rejects must fail (or be constant) on every context.
    use super::{attrs, compile};
    use crate::cel_lang::interp::interpret;
    use crate::condition::Scratch;
    use crate::context::{Message, RequestContext, ShieldValue};
    use proptest::prelude::*;

    /// Every field kind the native tree reads, as CEL writes it.
    const FIELDS: &[&str] = &[
        "request.model",
        "request.max_tokens",
        "request.temperature",
        "request.stream",
        "request.prompt",
        "request.estimated_tokens",
        "request.user",
        "principal.tier",
        "shield.pii",
        "request.headers['x-a']",
        "time.hour",
    ];
    /// Literals of every type.
    const LITERALS: &[&str] = &[
        "'gpt-4o'", "'h'", "''", "'zz'", "100", "1000", "-1", "0", "1000.5", "0.5", "true",
        "false", "null",
    ];
    const OPS: &[&str] = &["==", "!=", "<", "<=", ">", ">="];

    fn comparison() -> impl Strategy<Value = String> {
        (
            prop::sample::select(FIELDS),
            prop::sample::select(OPS),
            prop::sample::select(LITERALS),
            prop::bool::ANY,
        )
            .prop_map(|(f, o, l, swap)| {
                if swap {
                    format!("{l} {o} {f}")
                } else {
                    format!("{f} {o} {l}")
                }
            })
    }

    fn atom() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => comparison(),
            1 => prop::sample::select(vec![
                "principal.tier in ['free', 'trial']",
                "request.model in ['gpt-4o', 1, null]",
                "request.prompt.contains('key')",
                "request.prompt.startsWith('ign')",
                "request.user.endsWith('9')",
                "request.prompt.matches('k[a-z]+')",
                "'x-a' in request.headers",
                "request.stream",
                "has(shield.pii)",
                "'bash' in request.tools",
                "true",
                "false",
                "size(request.prompt) > 4",
                "size(request.messages) == 1",
                "2 <= request.prompt.size()",
                "size(request.tools) != 0",
                "size(request.user) < 7",
                "size(request.headers) >= 1",
                "request.messages.exists(m, m.role == 'tool')",
                "request.messages.all(m, size(m.content) < 10)",
                "request.messages.exists(m, m.content.contains('key') && m.role == 'user')",
                "request.messages.exists(m, m.role == 'tool' && request.max_tokens > 1000)",
                "request.messages.all(m, m.content.matches('k') || request.temperature < 1.0)",
                "request.tools.exists(t, t == 'bash')",
                "request.messages.exists(m, m.role < 'u')",
                "request.tools.all(t, t.startsWith('b'))",
            ])
            .prop_map(String::from),
        ]
    }

    fn condition() -> impl Strategy<Value = String> {
        atom().prop_recursive(3, 16, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} && {b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} || {b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
    }

    fn context() -> impl Strategy<Value = RequestContext> {
        (
            prop::option::of(prop::sample::select(vec![
                "gpt-4o",
                "gpt-4o-mini",
                "zz",
                "a",
                "",
            ])),
            prop::option::of(prop::sample::select(vec![100i64, 1000, 1001, 5000, -3, 0])),
            prop::option::of(prop::sample::select(vec![0.0f64, 0.5, 1000.5, 2.0])),
            prop::option::of(prop::sample::select(vec!["free", "pro", "h"])),
            prop::option::of(prop_oneof![
                prop::sample::select(vec![0.1f64, 0.9, 1000.5, 100.0])
                    .prop_map(ShieldValue::Number),
                Just(ShieldValue::Text("high".into())),
            ]),
            prop::sample::select(vec!["", "ignore the key", "kxyz", "h"]),
            prop::option::of(prop::sample::select(vec!["v", "gpt-4o", "zz"])),
            prop::bool::ANY,
            prop::option::of(Just("user-9")),
            (prop::bool::ANY, 0usize..3, 0i64..24),
        )
            .prop_map(
                |(model, max, temp, tier, pii, prompt, xa, stream, user, (bash, turns, hour))| {
                    let mut c = RequestContext::default();
                    c.request.model = model.map(String::from);
                    c.request.max_tokens = max;
                    c.request.temperature = temp;
                    c.request.prompt = prompt.to_string();
                    c.request.estimated_tokens = (prompt.len() as i64).div_euclid(4);
                    c.request.messages = match turns {
                        0 => vec![],
                        1 => vec![Message {
                            role: "user".into(),
                            content: prompt.into(),
                        }],
                        _ => vec![
                            Message {
                                role: "user".into(),
                                content: prompt.into(),
                            },
                            Message {
                                role: "tool".into(),
                                content: "tool output with a key".into(),
                            },
                        ],
                    };
                    c.request.stream = stream;
                    c.request.user = user.map(String::from);
                    if bash {
                        c.request.tools = vec!["bash".into()];
                    }
                    if let Some(v) = xa {
                        c.request.headers = vec![("x-a".into(), v.into())];
                    }
                    c.principal = vec![
                        ("id".into(), None),
                        ("team".into(), None),
                        ("tier".into(), tier.map(String::from)),
                    ];
                    if let Some(p) = pii {
                        c.shield = vec![("pii".into(), p)];
                    }
                    c.time.hour = hour;
                    c
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn native_equals_interpreter(src in condition(), ctx in context()) {
            let reference = interpret(&src, &ctx);
            match compile(&src, &attrs()) {
                Ok(compiled) => {
                    prop_assert!(compiled.native, "not translated: {}", src);
                    let native = compiled.cond.eval(ctx.view(), &mut Scratch::default());
                    match (&native, &reference) {
                        (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", src),
                        (Err(_), Err(_)) => {}
                        _ => prop_assert!(false, "{}: native {:?} vs interpreter {:?}", src, native, reference),
                    }
                }
                Err(e) => {
                    // Rejected at load: only comparisons whose value never decides (see the
                    // next property) may be rejected.
                    prop_assert_eq!(e.code, crate::diagnostic::Code::CelType, "{}: {}", src, e.message);
                }
            }
        }

        #[test]
        fn rejected_comparisons_never_depend_on_the_request(
            f in prop::sample::select(FIELDS),
            o in prop::sample::select(OPS),
            l in prop::sample::select(LITERALS),
            ctxs in prop::collection::vec(context(), 8),
        ) {
            let src = format!("{f} {o} {l}");
            if compile(&src, &attrs()).is_err() {
                let outcomes: Vec<_> = ctxs
                    .iter()
                    .map(|c| interpret(&src, c).map_err(|_| ()))
                    .collect();
                // The value never decides: the result is one bool, or an error (a missing key).
                let varies = outcomes.contains(&Ok(true)) && outcomes.contains(&Ok(false));
                prop_assert!(!varies, "{} was rejected but the interpreter gives {:?}", src, outcomes);
            }
        }
    }
}
