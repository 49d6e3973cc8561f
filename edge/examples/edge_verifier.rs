//! An edge node in a few lines: verify a key twice through `keywarden_edge::Verifier`
//! (the second answer comes from the local cache) and print how far behind the
//! revocation stream it is.
//!
//! With `cargo run -- serve --dev` running in another terminal:
//!
//! ```sh
//! KEYWARDEN_VERIFIER_TOKEN=kwt_... KEYWARDEN_EDGE_TOKEN=kwt_... \
//!   cargo run -p keywarden-edge --example edge_verifier -- kw_live_...
//! ```

use std::time::Duration;

use keywarden_edge::{EdgeConfig, Verifier};

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("set {name} (see `keywarden serve --dev` output)"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let addr =
        std::env::var("KEYWARDEN_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());
    let config = EdgeConfig::new(
        env("KEYWARDEN_VERIFIER_TOKEN")?,
        env("KEYWARDEN_EDGE_TOKEN")?,
    );
    let key = std::env::args()
        .nth(1)
        .ok_or("usage: edge_verifier <key> [scope ...]")?;
    let scopes: Vec<String> = std::env::args().skip(2).collect();

    let verifier = Verifier::connect_to(&addr, config)?;
    if !verifier.wait_connected(Duration::from_secs(5)).await {
        eprintln!("the revocation stream is not up yet: both verifies go to the server");
    }
    for attempt in ["first", "second"] {
        let answer = verifier.verify(&key, &scopes).await?;
        println!("{attempt} answer: {answer:?}");
    }
    println!("stats: {:?}", verifier.stats());
    println!("lag: {:?}", verifier.lag());
    verifier.shutdown().await;
    Ok(())
}
