//! `kvh completions SHELL`: a script the shell accepts, completing every verb.

mod cli_common;

use cli_common::{kvh, run, VERBS};

#[test]
fn the_bash_script_parses_and_completes_every_verb_and_option() {
    let (code, script, err) = run(kvh().args(["completions", "bash"]));
    assert_eq!(code, 0, "{err}");
    for verb in VERBS {
        assert!(script.contains(verb), "{verb} missing");
    }
    assert!(script.contains("--since") && script.contains("--key-file"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvh.bash");
    std::fs::write(&path, &script).unwrap();
    // `bash -n` parses without running: a script with a syntax error fails here.
    let parsed = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output();
    if let Ok(out) = parsed {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, script, err) = run(kvh().args(["completions", shell]));
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(script.contains("prune-log"), "{shell}");
    }
    let (code, _, err) = run(kvh().args(["completions", "tcsh"]));
    assert_eq!(code, 2);
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}
