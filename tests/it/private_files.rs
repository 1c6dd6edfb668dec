//! Acceptance test of issue 17 item 8: the spool is private whatever the umask, and secrets
//! that others can read are warned about. The real daemon under umask 000.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::bridge::{Bridge, BridgeOptions};
use crate::support::net;
use crate::support::poll_until;
use crate::support::recorder::{Recorder, Script};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_files_are_private_under_umask_000_and_open_secrets_or_directories_are_warned_about()
{
    let recorder = Recorder::start(Script::default()).await;
    let outside = tempfile::tempdir().expect("temp dir");
    let key_file = outside.path().join("lago.key");
    std::fs::write(&key_file, "k3y-never-logged\n").expect("write the key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let lago = format!(
        "[lago]\napi_url = \"http://{}\"\napi_key_file = \"{}\"\n",
        net::dead_addr(),
        key_file.display()
    );

    // A spool in directories the bridge creates.
    let spool = outside.path().join("state/bridge/spool.db");
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            umask: Some(0o000),
            spool_path: Some(spool.clone()),
            extra_toml: lago.clone(),
            ..Default::default()
        },
    )
    .await;
    let files = ["spool.db", "spool.db-wal", "spool.db-shm"].map(|f| spool.with_file_name(f));
    let all_there = poll_until(Duration::from_secs(10), || {
        files.iter().all(|f| f.exists()).then_some(())
    })
    .await;
    assert!(
        all_there.is_some(),
        "spool files: {files:?}\n{}",
        bridge.stderr()
    );
    assert_eq!(mode(&outside.path().join("state")), 0o700);
    assert_eq!(mode(&outside.path().join("state/bridge")), 0o700);
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    let warned = poll_until(Duration::from_secs(10), || {
        let stderr = bridge.stderr();
        (stderr.contains("secret file readable by others") && stderr.contains("mode 0644"))
            .then_some(())
    })
    .await;
    let stderr = bridge.stderr();
    assert!(warned.is_some(), "no warning about the key file:\n{stderr}");
    assert!(!stderr.contains("k3y-never-logged"));
    drop(bridge);

    // An existing directory open to others is the operator's choice: warned about, not changed.
    let shared = outside.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let bridge = Bridge::start_opts(
        &recorder.url_base(),
        BridgeOptions {
            umask: Some(0o022),
            spool_path: Some(shared.join("spool.db")),
            extra_toml: lago,
            ..Default::default()
        },
    )
    .await;
    let warned = poll_until(Duration::from_secs(10), || {
        bridge
            .stderr()
            .contains("the spool directory is open to other users")
            .then_some(())
    })
    .await;
    assert!(warned.is_some(), "{}", bridge.stderr());
    assert!(!bridge.stderr().contains("secret file readable by others"));
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&shared.join("spool.db")), 0o600);
}
