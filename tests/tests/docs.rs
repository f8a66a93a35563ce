//! What the Debian packages install beside the binaries, generated from the clap commands:
//! shell completions for mcimctl, and the man pages of mcimctl (1), tred and mcim-roles (8).
//! `ci/packages.sh` checks the same files once installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

use mcim_e2e::{mcimctl, output_text, workspace_bin};

/// What bash completes after `words` (the last one being completed) with mcimctl's script.
fn bash_completes(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let program = format!(
        "source {script}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\n\
         COMP_POINT=${{#COMP_LINE}}\n_mcimctl mcimctl '{cur}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script = script.display(),
        words = words.join(" "),
        cword = words.len() - 1,
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(program)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_mcimctl_subcommands_from_the_generated_script() {
    let dir = tempfile::tempdir().unwrap();
    let out = mcimctl(&["completions", "bash"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let script = dir.path().join("mcimctl");
    std::fs::write(&script, &out.stdout).unwrap();
    assert_eq!(bash_completes(&script, &["mcimctl", "dev"]), ["device"]);
    assert_eq!(
        bash_completes(&script, &["mcimctl", "device", "pi"]),
        ["pin"]
    );
    let subscriber = bash_completes(&script, &["mcimctl", "subscriber", "st"]);
    assert_eq!(subscriber, ["status"]);
    // zsh and fish get scripts of their own that know the same commands.
    for shell in ["zsh", "fish"] {
        let out = mcimctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", output_text(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("device") && text.contains("subscriber"),
            "{shell}"
        );
    }
    // An unknown shell is a usage error (2), naming the shells there are.
    let bad = mcimctl(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(output_text(&bad).contains("bash"), "{}", output_text(&bad));
}

#[test]
fn a_closed_pipe_is_an_error_not_a_panic() {
    let mut child = Command::new(workspace_bin("mcimctl"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn man_pages_cover_every_command_and_every_tred_setting() {
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man1");
    let man8 = dir.path().join("man8");
    let out = mcimctl(&["man", "--out-dir", man1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    // A page for mcimctl and for each subcommand, as git has.
    for page in [
        "mcimctl.1",
        "mcimctl-device.1",
        "mcimctl-device-pin-enable.1",
        "mcimctl-subscriber-status.1",
        "mcimctl-completions.1",
    ] {
        let text = std::fs::read_to_string(man1.join(page)).unwrap();
        assert!(
            text.starts_with(".ie \\n(.g") || text.contains(".TH"),
            "{page}"
        );
    }
    let top = std::fs::read_to_string(man1.join("mcimctl.1")).unwrap();
    for sub in ["device", "subscriber", "lab", "completions"] {
        assert!(
            top.contains(&format!("mcimctl\\-{sub}(1)")),
            "{sub} in mcimctl.1"
        );
    }

    let tred = Command::new(workspace_bin("tred"))
        .args(["--generate-man", man8.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(tred.status.success(), "{}", output_text(&tred));
    let page = std::fs::read_to_string(man8.join("tred.8")).unwrap();
    assert!(page.contains(".TH tred 8"), "{page}");
    let keys = Command::new(workspace_bin("tred"))
        .arg("--config-keys")
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&keys.stdout).lines().skip(1) {
        let (key, rest) = line.split_once(' ').unwrap();
        let var = rest.split_whitespace().next().unwrap();
        // roff escapes '-' and '_' is kept: the key and its variable are on the page.
        assert!(page.contains(key) && page.contains(var), "{key} {var}");
    }

    let roles = Command::new(workspace_bin("mcim-roles"))
        .args(["man", "--out-dir", man8.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(roles.status.success(), "{}", output_text(&roles));
    for role in ["all", "supplier", "ro", "vno", "sho", "pva"] {
        let text = std::fs::read_to_string(man8.join(format!("mcim-roles-{role}.8"))).unwrap();
        assert!(text.contains("listen") || role == "all", "{role}");
    }
    // The hidden generator is not a page of its own.
    assert!(!man8.join("mcim-roles-man.8").exists());

    // A folder that cannot be made: a clear error, exit 1, nothing written.
    let blocked = dir.path().join("file");
    std::fs::write(&blocked, b"").unwrap();
    let out = mcimctl(&["man", "--out-dir", blocked.join("x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("file/x"),
        "{}",
        output_text(&out)
    );
}

/// A role's URL that is not `https://host:port` is a usage error naming the form, before any
/// connection (exit 2), not a transport error later.
#[test]
fn a_wrong_role_url_is_a_usage_error() {
    for url in ["notaurl", "http://127.0.0.1:7404", "https://127.0.0.1"] {
        let out = mcimctl(&[
            "subscriber",
            "status",
            "--subscription",
            "001010000000001",
            "--sho-url",
            url,
            "--pki",
            "pki",
        ]);
        assert_eq!(out.status.code(), Some(2), "{url}: {}", output_text(&out));
        assert!(
            output_text(&out).contains("https://host:port"),
            "{url}: {}",
            output_text(&out)
        );
    }
}
