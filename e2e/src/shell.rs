//! Running helm, kubectl and the agent: argv in, stdout out, with a timeout and the command
//! line in every error.
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

fn display(argv: &[String]) -> String {
    argv.join(" ")
}

/// Runs `argv`, feeding `stdin`, killing it after `timeout`.
pub async fn run(
    argv: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let (prog, args) = argv.split_first().context("empty command line")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{}`", display(argv)))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .with_context(|| format!("writing stdin of `{}`", display(argv)))?;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("`{}` did not finish within {timeout:?}", display(argv)))?
        .with_context(|| format!("waiting for `{}`", display(argv)))?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `argv` and returns its stdout; a non-zero exit is an error carrying stderr.
pub async fn run_ok(argv: &[String], timeout: Duration) -> anyhow::Result<String> {
    let out = run(argv, None, timeout).await?;
    if !out.success() {
        bail!(
            "`{}` exited with {:?}: {}{}",
            display(argv),
            out.code,
            out.stderr.trim(),
            out.stdout.trim()
        );
    }
    Ok(out.stdout)
}

/// A long-running helper process (e.g. the remote host's agent), killed when dropped.
pub struct Background(#[allow(dead_code)] Child);

pub fn spawn(argv: &[String]) -> anyhow::Result<Background> {
    let (prog, args) = argv.split_first().context("empty command line")?;
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{}`", display(argv)))?;
    Ok(Background(child))
}

/// A long-running helper whose stdout lines are collected (e.g. the remote agent's `seen` log).
pub struct Captured {
    _child: Background,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Captured {
    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

pub fn spawn_captured(argv: &[String]) -> anyhow::Result<Captured> {
    use tokio::io::AsyncBufReadExt;
    let (prog, args) = argv.split_first().context("empty command line")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{}`", display(argv)))?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if let Ok(mut l) = sink.lock() {
                l.push(line);
            }
        }
    });
    Ok(Captured {
        _child: Background(child),
        lines,
    })
}

/// `prefix` + `argv` as one command line (prefix: e.g. `ip netns exec ps-remote`).
pub fn with_prefix(prefix: &[String], argv: &[&str]) -> Vec<String> {
    prefix
        .iter()
        .cloned()
        .chain(argv.iter().map(|s| s.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_failure() {
        let ok = run_ok(
            &["sh".into(), "-c".into(), "echo hi".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ok, "hi\n");
        let err = run_ok(
            &["sh".into(), "-c".into(), "echo bad >&2; exit 3".into()],
            Duration::from_secs(5),
        )
        .await;
        let msg = format!("{:#}", err.unwrap_err());
        assert!(msg.contains("Some(3)") && msg.contains("bad"), "{msg}");
    }

    #[tokio::test]
    async fn times_out() {
        let r = run(
            &["sleep".into(), "5".into()],
            None,
            Duration::from_millis(100),
        )
        .await;
        assert!(format!("{:#}", r.unwrap_err()).contains("did not finish"));
    }

    #[tokio::test]
    async fn collects_stdout_lines_of_a_background_process() {
        let c = spawn_captured(&[
            "sh".into(),
            "-c".into(),
            "echo one; echo two; sleep 5".into(),
        ])
        .unwrap();
        for _ in 0..50 {
            if c.lines().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(c.lines(), ["one", "two"]);
    }

    #[test]
    fn prefixes_commands() {
        let p = vec!["ip".to_string(), "netns".into(), "exec".into(), "r".into()];
        assert_eq!(
            with_prefix(&p, &["cat", "x"]).join(" "),
            "ip netns exec r cat x"
        );
        assert_eq!(with_prefix(&[], &["cat"]), ["cat"]);
    }
}
