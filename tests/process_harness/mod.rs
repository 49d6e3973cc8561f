//! Runs the real `keywarden` binary as a child process: its stdout and stderr are read
//! through pipes into buffers the tests inspect, and the child is killed when the handle
//! is dropped (also when a test panics).
//!
//! Used with `mod common;` next to it: the clients reuse `common::bearer`.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keywarden::proto::key_service_client::KeyServiceClient;
use keywarden::proto::verify_service_client::VerifyServiceClient;
use tonic::transport::Channel;

use crate::common::{AdminClient, VerifierClient, bearer};

/// How long a child gets to print a line or to exit.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// How often the buffers and the exit status are polled while waiting.
const POLL: Duration = Duration::from_millis(20);

/// `keywarden ARGS` with piped output and none of the caller's `KEYWARDEN_*` variables
/// (the test harness's own `KEYWARDEN_TEST_DATABASE_URL` would otherwise be read as
/// configuration). `RUST_LOG` is `info` unless the test sets it.
pub fn keywarden<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywarden"));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYWARDEN_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `keywarden serve --dev --data-dir DIR --listen 127.0.0.1:0`.
pub fn dev_server(data_dir: &Path) -> Command {
    keywarden(&[
        "serve".as_ref(),
        "--dev".as_ref(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])
}

/// `keywarden serve --config FILE --listen 127.0.0.1:0`.
pub fn config_server(config: &Path) -> Command {
    keywarden(&[
        "serve".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])
}

/// `cmd` run under `umask MASK`, through `sh`, which then `exec`s it (the child is the
/// same process): so a test of file modes does not depend on the umask it runs under.
pub fn with_umask(mask: &str, cmd: &Command) -> Command {
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(name, value),
            None => wrapped.env_remove(name),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wrapped
}

#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// A running (or finished) child. Dropping it kills the child if it still runs.
pub struct Process {
    child: Child,
    captured: Arc<Mutex<Captured>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Process {
    pub fn spawn(mut cmd: Command) -> Process {
        let mut child = cmd.spawn().expect("cannot start the keywarden binary");
        let captured = Arc::new(Mutex::new(Captured::default()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let readers = vec![
            drain(stdout, captured.clone(), |c| &mut c.stdout),
            drain(stderr, captured.clone(), |c| &mut c.stderr),
        ];
        Process {
            child,
            captured,
            readers,
            status: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.captured.lock().unwrap().stdout.clone()
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        self.captured.lock().unwrap().stderr.clone()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout_bytes()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr_bytes()).into_owned()
    }

    /// The complete stdout lines (those ended by a newline) so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        let out = self.stdout();
        match out.rfind('\n') {
            Some(end) => out[..end].lines().map(str::to_owned).collect(),
            None => Vec::new(),
        }
    }

    /// Waits until a complete stdout line satisfies `pred` and returns it. Panics (with
    /// the output so far) if the child exits first or `TIMEOUT` passes.
    pub async fn wait_for_stdout_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                self.join_readers();
                if let Some(line) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                    return line;
                }
                panic!(
                    "keywarden exited ({status}) before printing the expected line\n{}",
                    self.transcript()
                );
            }
            assert!(
                Instant::now() < deadline,
                "keywarden did not print the expected line within {TIMEOUT:?}\n{}",
                self.transcript()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until what the child wrote to stderr satisfies `pred`. Panics (with the
    /// output so far) if the child exits first or `TIMEOUT` passes.
    pub async fn wait_for_stderr(&mut self, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if pred(&self.stderr()) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                self.join_readers();
                if pred(&self.stderr()) {
                    return;
                }
                panic!(
                    "keywarden exited ({status}) before logging the expected text\n{}",
                    self.transcript()
                );
            }
            assert!(
                Instant::now() < deadline,
                "keywarden did not log the expected text within {TIMEOUT:?}\n{}",
                self.transcript()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the child to exit (at most `TIMEOUT`), then for its output to be read
    /// to the end.
    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "keywarden did not exit within {TIMEOUT:?}\n{}",
                self.transcript()
            );
            tokio::time::sleep(POLL).await;
        };
        self.status = Some(status);
        self.join_readers();
        status
    }

    /// Sends SIGTERM (through `kill`, so the tests need no libc binding).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("cannot run kill")
            .success();
        assert!(ok, "kill -TERM {} failed", self.id());
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait().await
    }

    /// stdout and stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn drain(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Captured>>,
    buffer: fn(&mut Captured) -> &mut Vec<u8>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buffer(&mut into.lock().unwrap()).extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// A `keywarden serve` child that has printed `listening on ADDR`.
pub struct Server {
    pub process: Process,
    pub addr: SocketAddr,
}

impl Server {
    pub async fn start(cmd: Command) -> Server {
        let mut process = Process::spawn(cmd);
        let line = process
            .wait_for_stdout_line(|l| l.starts_with("listening on "))
            .await;
        let addr = line["listening on ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
        Server { process, addr }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn admin(&self, token: &str) -> AdminClient {
        KeyServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    /// Creates a workspace (plan PRO) through the API, as an admin backend does first; one
    /// that exists already (a restarted server) is fine.
    pub async fn create_workspace(&self, admin_token: &str, workspace_id: &str) {
        let created =
            keywarden::proto::workspace_service_client::WorkspaceServiceClient::with_interceptor(
                self.channel().await,
                bearer(admin_token),
            )
            .create_workspace(keywarden::proto::CreateWorkspaceRequest {
                workspace_id: workspace_id.to_owned(),
                name: workspace_id.to_owned(),
                plan: keywarden::proto::Plan::Pro as i32,
                actor: Some(keywarden::proto::Actor {
                    id: "user_admin".to_owned(),
                    permissions: Vec::new(),
                }),
            })
            .await;
        if let Err(e) = created {
            assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        }
    }

    pub async fn verifier(&self, token: &str) -> VerifierClient {
        VerifyServiceClient::with_interceptor(self.channel().await, bearer(token))
    }

    /// The rest of the one stdout line that starts with `prefix`.
    pub fn stdout_value(&self, prefix: &str) -> String {
        let values: Vec<String> = self
            .process
            .stdout_lines()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
            .collect();
        assert_eq!(
            values.len(),
            1,
            "expected one line starting with {prefix:?}\n{}",
            self.process.transcript()
        );
        values.into_iter().next().unwrap()
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.process.terminate().await
    }
}

/// Writes a configuration file for `serve --config` / `migrate --config`: the given
/// database URL (if any) and caller tokens for `admin_token` and `verifier_token`,
/// configured by their SHA-256 as operators do.
pub fn write_config(
    dir: &Path,
    database_url: Option<&str>,
    admin_token: &str,
    verifier_token: &str,
) -> std::path::PathBuf {
    use sha2::{Digest, Sha256};
    let sha = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
    let mut toml = String::from("listen = \"127.0.0.1:0\"\ndatabase_max_connections = 4\n");
    if let Some(url) = database_url {
        toml.push_str(&format!("database_url = \"{url}\"\n"));
    }
    toml.push_str(&format!(
        "\n[[tokens]]\nname = \"console\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n\
         \n[[tokens]]\nname = \"gateway\"\nsha256 = \"{}\"\nroles = [\"verifier\"]\n",
        sha(admin_token),
        sha(verifier_token)
    ));
    let path = dir.join("keywarden.toml");
    std::fs::write(&path, toml).unwrap();
    path
}
