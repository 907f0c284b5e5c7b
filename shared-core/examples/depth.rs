use std::sync::Arc;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a[1].parse().unwrap();
    let op = a[2].clone();
    let stack: usize = a[3].parse().unwrap();
    let maxrec: u16 = a[4].parse().unwrap();
    let parse_only = a.len() > 5;
    let src = match op.as_str() {
        "add" => format!("request.model == 'boom' && request.max_tokens == {}", vec!["1"; n].join("+")),
        "and" => vec!["request.stream"; n].join(" && "),
        "paren" => format!("{}true{}", "(".repeat(n), ")".repeat(n)),
        "not" => format!("{}true", "!".repeat(n)),
        "list" => format!("{}1{} == 1", "[".repeat(n), "]".repeat(n)),
        "map" => format!("{}1{} == 1", "{1: ".repeat(n), "}".repeat(n)),
        "call" => format!("{}1{} == 1", "int(".repeat(n), ")".repeat(n)),
        "member" => format!("request.prompt{} == ''", ".lowerAscii()".repeat(n)),
        "ternary" => format!("{}false", "true ? true : ".repeat(n)),
        "index" => format!("[1]{} == 1", "[0]".repeat(n)),
        "exists" => format!("{}true{}", "[1].exists(x, ".repeat(n), ")".repeat(n)),
        _ => panic!(),
    };
    let h = std::thread::Builder::new().stack_size(stack).spawn(move || {
        let env = Arc::new(cel::Env::stdlib());
        let t = std::time::Instant::now();
        let p = cel::parser::PrattParser::new().max_recursion_depth(maxrec).parse(&src);
        let pt = t.elapsed();
        match p {
            Ok(_) if parse_only => println!("parsed+dropped {:?}", pt),
            Ok(p) => {
                let mut c = cel::Context::with_env(env.clone());
                c.add_variable_from_value("request", std::collections::HashMap::from([("model".to_string(), cel::Value::from("boom")), ("max_tokens".to_string(), cel::Value::from(3i64)), ("stream".to_string(), cel::Value::from(true)), ("prompt".to_string(), cel::Value::from("x"))]));
                let r = cel::Value::resolve(&p, &c);
                println!("ok parse {:?} eval {:?}", pt, r.map(|_|()).map_err(|e| e.to_string()));
            }
            Err(e) => println!("parse error {:?}: {}", pt, e.to_string().lines().next().unwrap_or("")),
        }
    }).unwrap();
    h.join().unwrap();
}
