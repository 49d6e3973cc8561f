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

/// The h2load command line the report documents (and this module runs): gRPC.
pub fn command(
    addr: &str,
    token: &str,
    data: &Path,
    method: &str,
    args: &BenchArgs,
) -> Vec<String> {
    command_as(
        addr,
        token,
        data,
        method,
        args,
        &["content-type: application/grpc", "te: trailers"],
    )
}

/// The same with other protocol headers (`content-type: application/json`: Connect).
fn command_as(
    addr: &str,
    token: &str,
    data: &Path,
    method: &str,
    args: &BenchArgs,
    headers: &[&str],
) -> Vec<String> {
    let connections = args.connections.max(1);
    let streams = (args.concurrency / connections).max(1);
    let mut cmd = vec![
        "h2load".into(),
        format!("--duration={}", args.duration.max(1.0).round()),
        format!("--clients={connections}"),
        format!("--max-concurrent-streams={streams}"),
        format!("--data={}", data.display()),
    ];
    cmd.extend(headers.iter().map(|h| format!("--header={h}")));
    cmd.push(format!("--header=authorization: Bearer {token}"));
    cmd.push(format!("http://{addr}/{method}"));
    cmd
}

async fn installed() -> bool {
    tokio::process::Command::new("h2load")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn verify_frame(key: &str) -> Vec<u8> {
    grpc_frame(&proto::VerifyKeyRequest {
        key: key.to_owned(),
        required_scopes: Vec::new(),
        cost: 0,
        resource: String::new(),
        client_ip: String::new(),
    })
}

/// The least a valid key's VerifyKey answer carries: a gRPC error is HTTP 200 too, with
/// no DATA, so each answer must carry at least this much.
fn min_verify_answer() -> u64 {
    grpc_frame(&proto::VerifyKeyResponse {
        valid: true,
        code: proto::VerifyCode::Valid as i32,
        key_id: "key_0000000000000000000000".into(),
        ..Default::default()
    })
    .len() as u64
}

/// Writes `key`'s VerifyKey request into `dir` and returns the h2load command that sends
/// it, and the least each answer must carry.
fn verify_command(
    dir: &Path,
    server: &ServerProcess,
    tokens: &Tokens,
    key: &str,
    args: &BenchArgs,
) -> Result<(Vec<String>, u64), BoxError> {
    let data = dir.join("verify.bin");
    std::fs::write(&data, verify_frame(key))?;
    let cmd = command(
        &server.addr.to_string(),
        &tokens.verifier,
        &data,
        "keywarden.v1.VerifyService/VerifyKey",
        args,
    );
    Ok((cmd, min_verify_answer()))
}

/// VerifyKey's requests per second through h2load with `key` (every answer valid), or
/// `None` when h2load is not installed: verify-naive's side of the independent ratio.
pub async fn verify_rps(
    server: &ServerProcess,
    tokens: &Tokens,
    key: &str,
    args: &BenchArgs,
) -> Result<Option<f64>, BoxError> {
    if !installed().await {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let (cmd, min_answer) = verify_command(dir.path(), server, tokens, key, args)?;
    Ok(Some(run(&cmd, min_answer).await?))
}

/// The bare no-op server's requests per second through h2load (the same Ping command as
/// Keywarden's, its bearer header ignored there), or `None` when h2load is not installed.
pub async fn bare_rps(bare: &ServerProcess, args: &BenchArgs) -> Result<Option<f64>, BoxError> {
    if !installed().await {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let ping = dir.path().join("ping.bin");
    let frame = grpc_frame(&proto::PingRequest {});
    std::fs::write(&ping, &frame)?;
    let cmd = command(
        &bare.addr.to_string(),
        "unused",
        &ping,
        "keywarden.v1.VerifyService/Ping",
        args,
    );
    Ok(Some(run(&cmd, frame.len() as u64).await?))
}

/// Requests per second of noop and verify-hit through h2load, or `None` when h2load is
/// not installed.
pub async fn measure(
    server: &ServerProcess,
    tokens: &Tokens,
    hit_key: &str,
    args: &BenchArgs,
) -> Result<Option<H2loadReport>, BoxError> {
    if !installed().await {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let ping = dir.path().join("ping.bin");
    std::fs::write(&ping, grpc_frame(&proto::PingRequest {}))?;
    let addr = server.addr.to_string();
    // Each answer must carry at least the response message a valid call gets (Ping: an
    // empty message; VerifyKey: a valid key's answer, which names at least its key id).
    let noop = command(
        &addr,
        &tokens.verifier,
        &ping,
        "keywarden.v1.VerifyService/Ping",
        args,
    );
    let noop_rps = run(&noop, grpc_frame(&proto::PingRequest {}).len() as u64).await?;
    let (verify, min_answer) = verify_command(dir.path(), server, tokens, hit_key, args)?;
    let verify_hit_rps = run(&verify, min_answer).await?;
    // verify-json: the same VerifyKey by the Connect protocol, in JSON, right after it.
    let json = dir.path().join("verify.json");
    std::fs::write(&json, serde_json::json!({ "key": hit_key }).to_string())?;
    let verify_json = command_as(
        &addr,
        &tokens.verifier,
        &json,
        "keywarden.v1.VerifyService/VerifyKey",
        args,
        &["content-type: application/json"],
    );
    // A valid key's JSON answer holds at least `{"valid":true,"code":"VERIFY_CODE_VALID"`.
    let verify_json_rps = run(&verify_json, 40).await?;
    // As a reader would type it: the token and this run's port and files elided.
    let redacted = |cmd: Vec<String>| {
        cmd.into_iter()
            .map(|a| {
                if a.starts_with("--header=authorization") {
                    "--header=\"authorization: Bearer $VERIFIER_TOKEN\"".to_owned()
                } else if let Some(path) = a.strip_prefix("--data=") {
                    let file = Path::new(path)
                        .file_name()
                        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
                    format!("--data={file}")
                } else if let Some(rest) = a.strip_prefix(&format!("http://{addr}/")) {
                    format!("http://127.0.0.1:$PORT/{rest}")
                } else if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    Ok(Some(H2loadReport {
        noop_rps,
        verify_hit_rps,
        verify_naive_rps: None,
        verify_json_rps: Some(verify_json_rps),
        commands: vec![redacted(noop), redacted(verify), redacted(verify_json)],
    }))
}

async fn run(cmd: &[String], min_answer_bytes: u64) -> Result<f64, BoxError> {
    let out = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = parse_rps(&text).ok_or_else(|| format!("no throughput in h2load output: {text}"))?;
    match (succeeded(&text), data_bytes(&text)) {
        (Some(n), Some(data)) if n > 0 && data >= n * min_answer_bytes => Ok(rps),
        _ => Err(format!("h2load's answers carry no gRPC messages (gRPC errors?): {text}").into()),
    }
}

/// `requests: 206172 total, 206172 started, 206172 done, 206172 succeeded, ...`
fn succeeded(output: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.starts_with("requests:"))?;
    line.split(',')
        .find(|p| p.trim_end().ends_with("succeeded"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `traffic: 10.27MB (10770328) total, ... headers (...), 1.97MB (2062440) data`
fn data_bytes(output: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.starts_with("traffic:"))?;
    let part = line.split(',').find(|p| p.trim_end().ends_with("data"))?;
    let inner = part.split_once('(')?.1.split_once(')')?.0;
    inner.trim().parse().ok()
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
            cost: 0,
            resource: String::new(),
            client_ip: String::new(),
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
        assert_eq!(succeeded(out), Some(206172));
        let traffic = "traffic: 10.27MB (10770328) total, 3.28MB (3437100) headers (space savings 95.10%), 1.97MB (2062440) data\n";
        assert_eq!(data_bytes(traffic), Some(2062440));
    }
}
