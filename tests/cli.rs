//! The three programs' command lines: `--help` and `--version` exit 0, a
//! bad flag exits 2 and a runtime failure 1, each with one clear line on
//! stderr; configuration errors name the file and the key.

use std::process::Command;

const BINS: [&str; 3] = [
    env!("CARGO_BIN_EXE_ims-crs"),
    env!("CARGO_BIN_EXE_ims-ms"),
    env!("CARGO_BIN_EXE_ims-client"),
];

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "off")
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version() {
    for bin in BINS {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(
            out.contains("Usage") && out.contains("--version"),
            "{bin}: {out}"
        );
        let (code, out, _) = run(bin, &["--version"]);
        assert_eq!(code, 0);
        assert!(
            out.trim().ends_with(env!("CARGO_PKG_VERSION")),
            "{bin}: {out}"
        );
    }
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for bin in BINS {
        let (code, _, err) = run(bin, &["--no-such-flag"]);
        assert_eq!(code, 2, "{bin}");
        assert_eq!(err.trim().lines().count(), 1, "{bin}: {err}");
        assert!(err.contains("no-such-flag"), "{err}");
    }
    let (code, _, err) = run(BINS[1], &["--capacity", "lots"]);
    assert_eq!(code, 2);
    assert!(err.contains("--capacity") && err.contains("lots"), "{err}");
}

#[test]
fn runtime_failures_exit_1_with_a_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-key");
    let (code, _, err) = run(
        BINS[0],
        &[
            "--listen",
            "127.0.0.1:0",
            "--data",
            dir.path().to_str().unwrap(),
            "--ms-key",
            missing.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("MSkey") && err.contains("no-such-key"),
        "{err}"
    );
    // A key others can read is refused.
    let key = dir.path().join("mskey");
    assert_eq!(run(BINS[0], &["genkey", key.to_str().unwrap()]).0, 0);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = run(
        BINS[1],
        &["--crs", "127.0.0.1:9", "--ms-key", key.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(err.contains("chmod 600"), "{err}");
    // An MS whose CRS is not there says so.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(
        BINS[1],
        &[
            "--listen",
            "127.0.0.1:0",
            "--crs",
            "127.0.0.1:9",
            "--ms-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("enrollment failed"), "{err}");
}

#[test]
fn config_errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ms.toml");
    std::fs::write(&cfg, "capacity = \"many\"\n").unwrap();
    let (code, _, err) = run(BINS[1], &["-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("ms.toml") && err.contains("capacity"), "{err}");
    std::fs::write(&cfg, "colour = \"blue\"\n").unwrap();
    let (code, _, err) = run(BINS[1], &["-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("colour"), "{err}");
}
