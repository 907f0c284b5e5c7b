//! A fast stand-in LLM upstream for load tests: answers every POST with a fixed OpenAI chat
//! completion (the Python mock of the end-to-end tests would be the bottleneck here).
//!
//! `bench-upstream ADDR`

use axum::routing::post;
use axum::Router;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18000".into());
    let app = Router::new().fallback(post(|| async {
        ([("content-type", "application/json")], ANSWER)
    }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
