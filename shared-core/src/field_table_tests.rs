//! The one table of context fields ([`crate::schema::FIELDS`]) reaches every consumer: for every
//! field, a request that differs only in it gets another cache key and another CEL value, and the
//! generated docs list it. A field added to the schema without a value, a cache-key entry or an
//! activation entry fails here (and `View::get` / `perturb` are exhaustive matches).

use cel::Value;

use crate::cache_key;
use crate::cel_lang::parse;
use crate::cel_program::activation;
use crate::context::{Api, Message, Provider, RequestContext, ShieldValue};
use crate::schema::{FieldRef, FIELDS};

/// Changes exactly the value of `field` (every variant is listed: a new one must be added).
fn perturb(c: &mut RequestContext, field: &FieldRef) {
    let r = &mut c.request;
    match field {
        FieldRef::Method => r.method = "PUT".into(),
        FieldRef::Path => r.path = "/other".into(),
        FieldRef::Host => r.host = "other.example".into(),
        FieldRef::Headers | FieldRef::Header(_) => r.headers.push(("x-a".into(), "2".into())),
        FieldRef::Provider => r.provider = Provider::Anthropic,
        FieldRef::Api => r.api = Api::Batch,
        FieldRef::Model => r.model = Some("other".into()),
        FieldRef::Stream => r.stream = !r.stream,
        FieldRef::MaxTokens => r.max_tokens = Some(7),
        FieldRef::Temperature => r.temperature = Some(0.25),
        FieldRef::User => r.user = Some("u2".into()),
        FieldRef::Messages => r.messages.push(Message {
            role: "user".into(),
            content: "more".into(),
        }),
        FieldRef::Prompt => r.prompt.push_str(" more"),
        FieldRef::PromptFolded => r.prompt_folded.push_str(" more"),
        FieldRef::PromptEntities => r.prompt_entities.push("email".into()),
        FieldRef::PromptInjection => r.prompt_injection = 0.9,
        FieldRef::EstimatedTokens => r.estimated_tokens = 99,
        FieldRef::Tools => r.tools.push("t2".into()),
        FieldRef::ToolTypes => r.tool_types.push("bash".into()),
        FieldRef::BodyBytes => r.body_bytes = 1234,
        FieldRef::PrincipalAll | FieldRef::Principal(_) => {
            c.principal = vec![("id".into(), Some("other".into()))]
        }
        FieldRef::ShieldAll | FieldRef::Shield(_) => {
            c.shield = vec![("x".into(), ShieldValue::Number(0.9))]
        }
        FieldRef::ResponseText => c.response.text.push_str(" more"),
        FieldRef::ResponseEntities => c.response.entities.push("email".into()),
        FieldRef::ResponseToolCalls => c.response.tool_calls.push("bash".into()),
        FieldRef::ResponseFinishReason => c.response.finish_reason = Some("length".into()),
        FieldRef::ResponseOutputTokens => c.response.output_tokens = Some(7),
        FieldRef::Hour => c.time.hour = 23,
        FieldRef::Weekday => c.time.weekday = 6,
        FieldRef::Elem(_) => {}
    }
}

fn base() -> RequestContext {
    let mut c = RequestContext {
        namespace: "default".into(),
        principal: vec![("id".into(), Some("u1".into()))],
        shield: vec![("x".into(), ShieldValue::Number(0.1))],
        ..RequestContext::default()
    };
    c.request.headers = vec![("x-a".into(), "1".into())];
    c
}

#[test]
fn every_schema_field_reaches_the_cache_key_the_cel_activation_and_the_docs() {
    let docs = include_str!("../../docs/context-schema.md");
    let mut checked = 0;
    for f in FIELDS {
        assert!(
            docs.contains(&format!("`{}`", f.path)),
            "{} is not in the docs",
            f.path
        );
        let (field, path) = match &f.field {
            Some(field) => (field.clone(), f.path.to_string()),
            None if f.path.starts_with("principal.") => {
                (FieldRef::Principal("id".into()), "principal.id".to_string())
            }
            None => (FieldRef::Shield("x".into()), "shield.x".to_string()),
        };
        let a = base();
        let mut b = base();
        perturb(&mut b, &field);
        let reads = [field.clone()];
        let key =
            |c: &RequestContext| cache_key::compute("bundle", "default", &[], &reads, c.views());
        assert_ne!(key(&a), key(&b), "{path}: the cache key ignores it");
        let expr = parse(&path).unwrap();
        let value = |c: &RequestContext| -> Value {
            let v = c.views().next().unwrap();
            Value::resolve(&expr, &activation(v, Some(&reads))).unwrap()
        };
        assert_ne!(
            value(&a),
            value(&b),
            "{path}: the CEL activation ignores it"
        );
        checked += 1;
    }
    assert_eq!(checked, FIELDS.len());
}
