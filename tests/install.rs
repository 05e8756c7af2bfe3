//! `make install` puts binaries, example configurations, documentation and
//! systemd units where they belong, and the units pass
//! `systemd-analyze verify` (when systemd-analyze is on the machine).

use std::path::Path;
use std::process::Command;

#[test]
fn make_install_and_the_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("make")
        .current_dir(root)
        .arg("install")
        .arg("PROFILE=debug")
        .arg(format!("PREFIX={}", prefix.display()))
        .output()
        .expect("run make install");
    assert!(
        out.status.success(),
        "make install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "bin/ims-crs",
        "bin/ims-ms",
        "bin/ims-client",
        "share/ims/examples/crs.toml",
        "share/ims/examples/ms.toml",
        "share/ims/examples/client.toml",
        "share/doc/ims/README.md",
        "share/doc/ims/PROTOCOL.md",
        "lib/systemd/system/ims-crs.service",
        "lib/systemd/system/ims-ms@.service",
    ] {
        assert!(prefix.join(f).exists(), "{f} was not installed");
    }
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/ims-crs.service")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={}/bin/ims-crs", prefix.display())),
        "{unit}"
    );
    for key in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "StateDirectory=ims-crs",
    ] {
        assert!(unit.contains(key), "ims-crs.service lacks {key}");
    }
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("systemd-analyze is not installed; units not verified");
        return;
    };
    assert!(version.status.success());
    let units = prefix.join("lib/systemd/system");
    // A template is verified through an instance of it.
    let instance = units.join("ims-ms@east.service");
    std::fs::copy(units.join("ims-ms@.service"), &instance).unwrap();
    for u in ["ims-crs.service", "ims-ms@east.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join(u))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        // Only problems with our units count, not with the host's others.
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("ims-")).collect();
        assert!(out.status.success() && ours.is_empty(), "{u}: {text}");
    }
}
