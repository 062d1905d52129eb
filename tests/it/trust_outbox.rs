//! Issue 16, defect 10: outbox entries sealed under another agent key (the key was
//! changed) are kept, not dropped; they are reported (a log line and the
//! `backupy_agent_outbox_undecryptable_entries` gauge), they do not block the entries
//! behind them, and the previous key delivers them again (docs/security.md).

use backupy_agent::crypto::at_rest::StateCipher;
use backupy_agent::outbox::{Limits, Outbox};
use backupy_agent::secrets::Secret;
use backupy_agent::wire::pb::{self, envelope::Payload};
use prost::Message;

fn completed(run_id: &str) -> Payload {
    Payload::BackupCompleted(pb::BackupCompleted {
        job_id: "nightly".into(),
        run_id: run_id.into(),
        s3_key: format!("k/{run_id}"),
        ..Default::default()
    })
}

fn run_ids(outbox: &Outbox) -> Vec<String> {
    outbox
        .pending(0, 256)
        .unwrap()
        .into_iter()
        .map(|e| match pb::Envelope::decode(e.envelope.as_slice()).unwrap().payload {
            Some(Payload::BackupCompleted(c)) => c.run_id,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn entries_sealed_under_another_agent_key_are_kept_reported_and_do_not_block_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let old_key = StateCipher::from_agent_key(&Secret::new("old-agent-key-1234"));
    let new_key = StateCipher::from_agent_key(&Secret::new("new-agent-key-5678"));
    {
        let outbox = Outbox::open(dir.path(), Limits::default()).unwrap().sealed_with(old_key.clone());
        // More than one batch of them, so a queue that only skipped would still stall.
        for i in 0..300 {
            outbox.push(completed(&format!("old-{i}")), "").unwrap();
        }
    }
    let outbox = Outbox::open(dir.path(), Limits::default()).unwrap().sealed_with(new_key);
    let gauge = prometheus::IntGauge::new("backupy_agent_outbox_undecryptable_entries", "test").unwrap();
    outbox.report_undecryptable_to(gauge.clone());
    outbox.push(completed("new-1"), "").unwrap();
    assert_eq!(run_ids(&outbox), ["new-1"], "the entry behind them is delivered");
    assert_eq!(gauge.get(), 300, "reported in the metric");
    assert_eq!(outbox.undecryptable(), 300);
    // Asking again reports nothing new and still keeps them.
    assert_eq!(run_ids(&outbox), ["new-1"]);
    assert_eq!(gauge.get(), 300);
    drop(outbox);

    // The recovery docs/security.md describes: the previous key delivers every one.
    let outbox = Outbox::open(dir.path(), Limits::default()).unwrap().sealed_with(old_key);
    let ids = outbox.pending(0, 1000).unwrap().len();
    assert_eq!(ids, 300, "the BackupCompleted entries were not lost");
}
