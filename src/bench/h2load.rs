//! The independent check: h2load (Debian's nghttp2-client) sends pre-encoded gRPC frames,
//! so the figures do not rest on our own client. A gRPC message on the wire is one flag
//! byte (0: not compressed), a big-endian u32 length, then the protobuf bytes.

use std::path::Path;
use std::process::Stdio;

use prost::Message;

use super::report::H2loadReport;
use super::server::{ServerProcess, Tokens};
use super::{BenchArgs, BoxError};
use crate::proto;

pub fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The h2load command line the report documents (and this module runs).
pub fn command(
    addr: &str,
    token: &str,
    data: &Path,
    method: &str,
    args: &BenchArgs,
) -> Vec<String> {
    let connections = args.connections.max(1);
    let streams = (args.concurrency / connections).max(1);
    vec![
        "h2load".into(),
        format!("--duration={}", args.duration.max(1.0).round()),
        format!("--clients={connections}"),
        format!("--max-concurrent-streams={streams}"),
        format!("--data={}", data.display()),
        "--header=content-type: application/grpc".into(),
        "--header=te: trailers".into(),
        format!("--header=authorization: Bearer {token}"),
        format!("http://{addr}/{method}"),
    ]
}

/// Requests per second of noop and verify-hit through h2load, or `None` when h2load is
/// not installed.
pub async fn measure(
    server: &ServerProcess,
    tokens: &Tokens,
    hit_key: &str,
    args: &BenchArgs,
) -> Result<Option<H2loadReport>, BoxError> {
    let installed = tokio::process::Command::new("h2load")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !installed {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let ping = dir.path().join("ping.bin");
    let verify = dir.path().join("verify.bin");
    std::fs::write(&ping, grpc_frame(&proto::PingRequest {}))?;
    std::fs::write(
        &verify,
        grpc_frame(&proto::VerifyKeyRequest {
            key: hit_key.to_owned(),
            required_scopes: Vec::new(),
        }),
    )?;
    let addr = server.addr.to_string();
    let noop_rps = run(&command(
        &addr,
        &tokens.verifier,
        &ping,
        "keywarden.v1.VerifyService/Ping",
        args,
    ))
    .await?;
    let verify_hit_rps = run(&command(
        &addr,
        &tokens.verifier,
        &verify,
        "keywarden.v1.VerifyService/VerifyKey",
        args,
    ))
    .await?;
    Ok(Some(H2loadReport {
        noop_rps,
        verify_hit_rps,
    }))
}

async fn run(cmd: &[String]) -> Result<f64, BoxError> {
    let out = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_rps(&text).ok_or_else(|| format!("no throughput in h2load output: {text}").into())
}

/// Reads `finished in 5.00s, 41234.56 req/s, ...` and checks every request succeeded.
pub fn parse_rps(output: &str) -> Option<f64> {
    let status = output
        .lines()
        .find(|l| l.trim_start().starts_with("status codes:"))?;
    let ok_2xx: u64 = status.split_whitespace().nth(2)?.parse().ok()?;
    let line = output.lines().find(|l| l.starts_with("finished in"))?;
    let rps = line
        .split(',')
        .nth(1)?
        .trim()
        .strip_suffix("req/s")?
        .trim()
        .parse()
        .ok()?;
    (ok_2xx > 0).then_some(rps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_length_prefix() {
        assert_eq!(grpc_frame(&proto::PingRequest {}), [0, 0, 0, 0, 0]);
        let f = grpc_frame(&proto::VerifyKeyRequest {
            key: "abc".into(),
            required_scopes: vec![],
        });
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(&f[5..], &[10, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn h2load_output_is_parsed() {
        let out = "finished in 5.00s, 41234.56 req/s, 4.02MB/s\n\
                   requests: 206172 total, 206172 started, 206172 done, 206172 succeeded, 0 failed, 0 errored, 0 timeout\n\
                   status codes: 206172 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(parse_rps(out), Some(41234.56));
        assert_eq!(parse_rps("garbage"), None);
    }
}
