//! The CRS's files on disk: its data directory is private whatever the
//! umask, and a data directory others can read is refused.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use ims::crs::{self, CrsConfig, CrsError};

fn config(dir: &Path, data: &Path) -> CrsConfig {
    let key = dir.join("mskey");
    if !key.exists() {
        ims::keyfile::generate_ms_key(&key).unwrap();
    }
    CrsConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: data.to_owned(),
        ms_key_file: key,
        ..CrsConfig::default()
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every path under `dir` with its mode.
fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push((p.clone(), mode(&p)));
        if p.is_dir() {
            walk(&p, out);
        }
    }
}

#[test]
fn the_data_directory_is_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    // A parent open to all, as a hand-started CRS under umask 022 finds.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("nested").join("crs-data");
    let running = crs::start(config(dir.path(), &data)).expect("the CRS starts");
    running.stopper().stop();
    running.join();
    assert_eq!(mode(&data), 0o700);
    let mut all = Vec::new();
    walk(&data, &mut all);
    assert!(all.iter().any(|(p, _)| p.is_file()), "no files: {all:?}");
    for (p, m) in &all {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{} is {m:o}", p.display());
    }
    // It starts again on its own directory.
    let running = crs::start(config(dir.path(), &data)).expect("the CRS starts again");
    running.stopper().stop();
    running.join();
}

#[test]
fn a_data_directory_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("open");
    fs::DirBuilder::new().mode(0o755).create(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o750)).unwrap();
    match crs::start(config(dir.path(), &data)) {
        Err(CrsError::DataDir(why)) => assert!(why.contains("chmod 700"), "{why}"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("the CRS started on a data directory others can read"),
    }
    assert!(
        fs::read_dir(&data).unwrap().next().is_none(),
        "nothing was written there"
    );
}
