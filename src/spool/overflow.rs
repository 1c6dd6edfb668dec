//! I/O: tap records the SQLite spool could not take, kept as fsync'd JSON lines in
//! `spool.overflow_dir` (by default systemd's `RuntimeDirectory`, a tmpfs that survives service
//! restarts) until the next start ingests them before anything else.
//!
//! Two files are appended to, each by one side only:
//! - [`UNCOMMITTED`]: the writer's records whose commit failed (disk full, I/O error). Once a
//!   commit succeeds with nothing left in memory the file is removed: everything in it is in SQLite.
//! - [`QUEUE_FULL`]: records the relay could not even queue for the writer (its queue was full);
//!   queueing never waits, so this is where they go instead.
//!
//! Ingesting first renames each live file to `*.ingesting.jsonl`, so appends during and after it
//! start a fresh file; the renamed files are removed only once what they held is committed.
//! A crash between that commit and the removal ingests them once more at the next start: the
//! ledger takes a record it has already applied as a duplicate (property-tested in
//! `ledger/tests.rs`), so nothing is billed twice.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::tap::{TapKind, TapRecord};

/// The writer's records whose commit failed.
pub const UNCOMMITTED: &str = "uncommitted.jsonl";
/// Records the relay could not queue for the writer.
pub const QUEUE_FULL: &str = "queue-full.jsonl";
/// Suffix of a file being ingested.
const INGESTING: &str = ".ingesting.jsonl";

/// The overflow directory.
#[derive(Debug)]
pub struct Overflow {
    dir: PathBuf,
    /// One append at a time: each line goes out in one `write`, never interleaved.
    appending: Mutex<()>,
}

/// What [`Overflow::take`] read: the records in file order, and the files to remove once
/// they are committed.
#[derive(Debug, Default)]
pub struct Taken {
    pub records: Vec<TapRecord>,
    pub files: Vec<PathBuf>,
}

impl Overflow {
    /// The overflow directory `dir` (created on the first append, mode 0700).
    pub fn new(dir: PathBuf) -> Self {
        Overflow {
            dir,
            appending: Mutex::new(()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `records` as JSON lines to `file`, fsync'd before it returns `Ok`.
    pub fn append<'a>(
        &self,
        file: &str,
        records: impl IntoIterator<Item = &'a str>,
    ) -> std::io::Result<()> {
        let mut text = String::new();
        for json in records {
            text.push_str(json);
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        let _one = crate::lock(&self.appending);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let path = self.dir.join(file);
        let created = !path.exists();
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
        if created {
            // The new name itself must survive a crash.
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Removes the writer's own file: everything it held is committed.
    pub fn remove_uncommitted(&self) -> std::io::Result<()> {
        remove(&self.dir.join(UNCOMMITTED))
    }

    /// Moves both live files aside and reads every file waiting to be ingested (also those a
    /// crash left mid-ingest), oldest first. A line that cannot be read (a write torn by a
    /// crash) is logged at ERROR with its text and skipped.
    pub fn take(&self) -> std::io::Result<Taken> {
        let mut taken = Taken::default();
        if !self.dir.exists() {
            return Ok(taken);
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        {
            let _one = crate::lock(&self.appending);
            for live in [UNCOMMITTED, QUEUE_FULL] {
                let from = self.dir.join(live);
                if from.exists() {
                    let stem = live.trim_end_matches(".jsonl");
                    std::fs::rename(
                        &from,
                        self.dir.join(format!("{stamp:039}-{stem}{INGESTING}")),
                    )?;
                }
            }
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(INGESTING))
            })
            .collect();
        // Zero-padded stamps: name order is age order; within a stamp the writer's file first.
        files.sort_by_key(|path| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            (
                name.get(..39).map(str::to_owned),
                !name.contains("uncommitted"),
            )
        });
        for path in &files {
            for (number, line) in BufReader::new(File::open(path)?).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<TapRecord>(&line) {
                    Ok(record) => taken.records.push(record),
                    Err(error) => {
                        metrics::counter!("ocpp_lago_bridge_tap_records_lost_total").increment(1);
                        tracing::error!(file = %path.display(), line = number + 1, %error, text = %line, "overflow line unreadable (torn by a crash?): its record is lost; re-enter it from this text");
                    }
                }
            }
        }
        taken.files = files;
        Ok(taken)
    }
}

/// Removes `path`; a file already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// The last resort: a record neither SQLite nor the overflow directory could take. Logged at
/// ERROR with everything needed to re-enter it (charge box, transaction, the readings in the
/// record's JSON), and counted.
pub fn log_lost(record_json: &str, why: &str) {
    metrics::counter!("ocpp_lago_bridge_tap_records_lost_total").increment(1);
    let parsed = serde_json::from_str::<TapRecord>(record_json).ok();
    let charge_box_id = parsed.as_ref().map_or("", |r| r.charge_box_id.as_str());
    let ocpp_transaction_id = parsed.as_ref().and_then(|r| transaction_id(&r.kind));
    tracing::error!(
        charge_box_id,
        ocpp_transaction_id,
        why,
        record = record_json,
        "billing record LOST: neither the spool nor spool.overflow_dir could take it; re-enter it from `record` (its readings are there)"
    );
}

fn transaction_id(kind: &TapKind) -> Option<i64> {
    match kind {
        TapKind::Start(s) => Some(s.ocpp_transaction_id),
        TapKind::MeterValues(m) => Some(m.ocpp_transaction_id),
        TapKind::Stop(s) => Some(s.ocpp_transaction_id),
        TapKind::Unreadable(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::StopRecord;
    use rust_decimal::Decimal;
    use std::os::unix::fs::PermissionsExt;

    /// A Stop record of session `tx`.
    fn stop_record(tx: i64) -> TapRecord {
        TapRecord {
            charge_box_id: "CP".into(),
            received_at: 1_767_265_200,
            kind: TapKind::Stop(StopRecord {
                ocpp_transaction_id: tx,
                meter_stop_wh: Decimal::from(5),
                timestamp: None,
                id_tag: None,
                reason: None,
                begin_reading: None,
                readings: vec![],
            }),
        }
    }

    fn stop(tx: i64) -> String {
        serde_json::to_string(&stop_record(tx)).unwrap()
    }

    #[test]
    fn appended_records_are_taken_back_in_order_from_private_files_and_appends_go_on_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let overflow = Overflow::new(dir.path().join("overflow"));
        assert!(
            overflow.take().unwrap().records.is_empty(),
            "no directory yet"
        );
        overflow.append(UNCOMMITTED, [stop(1).as_str()]).unwrap();
        overflow.append(QUEUE_FULL, [stop(3).as_str()]).unwrap();
        overflow
            .append(UNCOMMITTED, [stop(2).as_str(), "{torn"])
            .unwrap();
        let mode = std::fs::metadata(dir.path().join("overflow").join(QUEUE_FULL))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let taken = overflow.take().unwrap();
        let ids: Vec<_> = taken
            .records
            .iter()
            .map(|r| transaction_id(&r.kind))
            .collect();
        assert_eq!(ids, [Some(1), Some(2), Some(3)]);
        assert_eq!(taken.files.len(), 2);
        // Appends after the take start new files, read by the next take with the old ones.
        overflow.append(QUEUE_FULL, [stop(4).as_str()]).unwrap();
        assert_eq!(overflow.take().unwrap().records.len(), 4);
        for file in overflow.take().unwrap().files {
            remove(&file).unwrap();
        }
        assert!(overflow.take().unwrap().records.is_empty());
    }

    #[tokio::test]
    async fn a_record_for_a_stopped_writer_is_kept_in_the_overflow_before_its_receipt_fires() {
        let dir = tempfile::tempdir().unwrap();
        let overflow = std::sync::Arc::new(Overflow::new(dir.path().join("overflow")));
        let (commands, receiver) = tokio::sync::mpsc::channel(4);
        drop(receiver); // the writer has ended (it panicked, or the daemon is exiting)
        let spool = crate::spool::SpoolHandle::new(commands, Some(overflow.clone()));
        let receipt = spool.try_submit(stop_record(7)).expect("kept, not lost");
        tokio::time::timeout(std::time::Duration::from_secs(5), receipt)
            .await
            .expect("the receipt fires once the record is fsync'd")
            .expect("fired, not dropped");
        let taken = overflow.take().unwrap();
        assert_eq!(
            taken.records,
            vec![stop_record(7)],
            "ingested at the next start"
        );

        // Without an overflow directory the record is reported lost, never silently dropped.
        let (commands, receiver) = tokio::sync::mpsc::channel(4);
        drop(receiver);
        let error = crate::spool::SpoolHandle::new(commands, None)
            .try_submit(stop_record(8))
            .unwrap_err();
        assert!(
            matches!(error, crate::spool::SubmitError::Stopped(_)),
            "{error}"
        );
        assert_eq!(*error.record(), stop_record(8));
    }
}
