//! The documentation runs as printed: every `sh` block of docs/cli.md, in order, in one
//! bash session, against a real dev server (`keywarden serve --dev`) and the real binary,
//! so that a documented command that stops working fails here.
//!
//! What the runner takes from the text, and nothing else:
//! - the block that starts the server (`keywarden serve --dev`) is the server this test
//!   started, and is not run again;
//! - the address `http://127.0.0.1:50051` is this server's; a line `NAME=kwt_...  # the
//!   "<role> token:" line` gets that line of the server's output, as a reader pastes it;
//! - every command (a line, with its `\` continuations) must exit 0, unless its comment
//!   says `exit N`: then it must exit N;
//! - a comment `prints: TEXT` means its output must contain TEXT.

mod common;
mod process_harness;

use std::process::Stdio;

use process_harness::{Server, dev_server};

/// One command of a block: its text (continuations joined) and what it must do.
#[derive(Debug)]
struct Step {
    command: String,
    /// The trailing comment, which says what to paste and what to expect.
    comment: String,
    exit: i32,
    prints: Option<String>,
}

/// The `sh` blocks of a Markdown text, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The commands of a block, each with the exit status and output its comment promises.
fn steps(block: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let (command, comment) = split_comment(&full);
        let exit = comment
            .and_then(|c| c.split("exit ").nth(1))
            .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let prints = comment
            .and_then(|c| c.split("prints: ").nth(1))
            .map(|t| t.trim().to_owned());
        steps.push(Step {
            command: command.trim_end().to_owned(),
            comment: comment.unwrap_or("").to_owned(),
            exit,
            prints,
        });
    }
    steps
}

/// A command and its trailing comment: the first ` #` outside quotes.
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let (mut single, mut double) = (false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && i > 0 && bytes[i - 1] == b' ' => {
                return (&line[..i], Some(&line[i + 1..]));
            }
            _ => {}
        }
    }
    (line, None)
}

/// The command as a reader pastes it: this server's address, and the token its output
/// printed where the comment names that line (`# the "admin token:" line`).
fn substitute(step: &Step, server: &Server) -> String {
    let mut command = step
        .command
        .replace("http://127.0.0.1:50051", &format!("http://{}", server.addr));
    if let Some(role) = step
        .comment
        .split("the \"")
        .nth(1)
        .and_then(|rest| rest.split(" token:\"").next())
    {
        command = command.replace("kwt_...", &server.stdout_value(&format!("{role} token: ")));
    }
    command
}

/// Commands that change the shell itself (variables, `export`) run in it; the others in
/// `$( ... )`, so that their output can be checked.
fn in_shell(command: &str) -> bool {
    let first = command.trim_start();
    first.starts_with("export ")
        || first.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
}

/// Bash that runs the steps in one session and stops at the first that breaks its
/// promise, saying which.
fn script(steps: &[(Step, String)]) -> String {
    let mut script = String::from("set -u\n");
    for (i, (step, command)) in steps.iter().enumerate() {
        let shown = step.command.replace('\'', "'\\''");
        if in_shell(command) {
            script.push_str(&format!("{command}\nrc=$?\nout_{i}=''\n"));
        } else {
            script.push_str(&format!(
                "out_{i}=$( {{ {command}\n}} 2>&1 ); rc=$?\nprintf '%s\\n' \"$out_{i}\"\n"
            ));
        }
        script.push_str(&format!(
            "if [ $rc -ne {exit} ]; then echo \"DOCS STEP FAILED (exit $rc, expected {exit}): {shown}\" >&2; printf '%s\\n' \"$out_{i}\" >&2; exit 1; fi\n",
            exit = step.exit,
        ));
        if let Some(text) = &step.prints {
            let text = text.replace('\'', "'\\''");
            script.push_str(&format!(
                "case \"$out_{i}\" in *'{text}'*) ;; *) echo 'DOCS STEP PRINTED OTHERWISE (wanted {text}): {shown}' >&2; exit 1;; esac\n"
            ));
        }
    }
    script
}

#[test]
fn the_runner_reads_commands_their_continuations_and_promises() {
    let block = "# a comment\nkeywarden keys get x   # error: NOT_FOUND, exit 2\nA=$(b \\\n  c) # prints: ok\necho '# not a comment'\n";
    let s = steps(block);
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(
        (s[0].command.as_str(), s[0].exit),
        ("keywarden keys get x", 2)
    );
    assert_eq!(s[1].command, "A=$(b    c)");
    assert_eq!(s[1].prints.as_deref(), Some("ok"));
    assert_eq!(s[2].command, "echo '# not a comment'");
    assert!(in_shell("export A=1") && in_shell("KEY=$(x)") && !in_shell("echo A=1"));
    assert_eq!(
        sh_blocks("x\n```sh\na\nb\n```\n```toml\nc\n```\n```sh\nd\n```\n"),
        ["a\nb\n", "d\n"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_cli_guide_runs_as_printed() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(&dir.path().join("data"))).await;
    let mut all = Vec::new();
    for block in sh_blocks(&doc) {
        if block.contains("keywarden serve --dev") {
            continue;
        }
        for step in steps(&block) {
            let command = substitute(&step, &server);
            all.push((step, command));
        }
    }
    assert!(
        all.len() > 40,
        "the guide's commands were not found: {}",
        all.len()
    );
    let text = script(&all);

    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_keywarden"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("-c")
        .arg(&text)
        .current_dir(dir.path())
        .env("PATH", path);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARDEN_") {
            cmd.env_remove(&name);
        }
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        cmd.stdin(Stdio::null()).output(),
    )
    .await
    .expect("the guide's commands did not finish")
    .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "docs/cli.md as printed failed\n--- stderr ---\n{stderr}\n--- stdout (tail) ---\n{}",
        stdout
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.terminate().await;
}
