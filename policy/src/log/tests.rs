//! Decision-log tests on real segment files in a temp dir; tampering is done on the files
//! the way someone with write access to the disk (but not the checkpoint key) would.

use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::engine::tests::facts;
use crate::{PolicyEngine, SourceFile};

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn input(i: u64) -> DecisionRecordInput {
    let mut r = DecisionRecordInput::admin("tester", &format!("event {i}"), t(i));
    r.decision = if i.is_multiple_of(2) {
        DecisionKind::Allow
    } else {
        DecisionKind::Deny
    };
    r.resource = format!("svc{}.shop.west", i % 3);
    r.reasons = vec![format!("p{}", i % 2)];
    r
}

fn options() -> LogOptions {
    LogOptions::default()
}

fn filled(n: u64, signer: Option<CheckpointSigner>) -> (tempfile::TempDir, DecisionLog) {
    filled_with(n, signer, options())
}

fn filled_with(
    n: u64,
    signer: Option<CheckpointSigner>,
    options: LogOptions,
) -> (tempfile::TempDir, DecisionLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = DecisionLog::open(&dir.path().join("audit"), signer, options).unwrap();
    for i in 1..=n {
        log.append(input(i)).unwrap();
    }
    (dir, log)
}

fn audit(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("audit")
}

/// Every frame of a one-segment log: (kind, payload).
fn frames(dir: &Path) -> (PathBuf, u64, Vec<(u8, Vec<u8>)>) {
    let segs = segment::list(dir).unwrap();
    assert_eq!(segs.len(), 1, "these tests tamper with one-segment logs");
    let (first, path) = segs[0].clone();
    let mut r = segment::Reader::open(&path).unwrap();
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        out.push((f.kind, f.payload));
    }
    (path, first, out)
}

fn rewrite(path: &Path, first: u64, frames: &[(u8, Vec<u8>)]) {
    let mut bytes = segment::header(first).to_vec();
    for (kind, payload) in frames {
        segment::push_frame(&mut bytes, *kind, payload.len());
        bytes.extend_from_slice(payload);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Index of the frame holding record `seq`.
fn record_frame(frames: &[(u8, Vec<u8>)], seq: u64) -> usize {
    frames
        .iter()
        .position(|(k, p)| *k == KIND_RECORD && body_seq(&p[32..]) == Some(seq))
        .unwrap()
}

fn reencode(rec: &mut DecisionRecord) -> Vec<u8> {
    record::encode(rec).unwrap()
}

fn first_bad(log: &DecisionLog) -> (u64, String) {
    let report = log.verify().unwrap();
    let p = report.first_bad().expect("tampering must be found");
    (p.seq, p.what.clone())
}

#[test]
fn appends_chain_and_verify() {
    let (d, log) = filled(5, None);
    let report = log.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(
        (report.records, report.first_seq, report.head_seq),
        (5, 1, 5)
    );
    let all = log.query(&Filter::default()).unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].prev_hash, GENESIS_HASH);
    assert_eq!(all[1].prev_hash, all[0].hash);
    assert_eq!(all[0].id.len(), 32);
    assert_eq!(log.head(), (5, all[4].hash.clone()));
    // Reopening continues the chain; a second appender is refused while one is open.
    assert!(matches!(
        DecisionLog::open(&audit(&d), None, options()),
        Err(LogError::Locked(_))
    ));
    drop(log);
    let log = DecisionLog::open(&audit(&d), None, options()).unwrap();
    assert_eq!(log.append(input(6)).unwrap().seq, 6);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn the_split_encoding_is_the_canonical_one() {
    let e = PolicyEngine::from_sources(
        &[SourceFile {
            name: "a.cedar".into(),
            text: "@id(\"all\") permit (principal, action, resource);".into(),
        }],
        None,
    )
    .unwrap();
    let f = facts(
        "spiffe://east.example/ns/shop/sa/web",
        "GET",
        "orders.shop.west",
        "/a/../b?q=\"x\"",
    );
    let mut input = DecisionRecordInput::from_decision(&f, &e.decide(&f));
    input.quota_key = Some("k".into());
    input.status = Some(200);
    let prepared = record::prepare(&input).unwrap();
    let mut split = Vec::new();
    record::body(42, GENESIS_HASH, &prepared, &mut split);
    let mut whole = DecisionRecord::new(
        input.clone(),
        42,
        GENESIS_HASH.to_owned(),
        prepared.id.clone(),
    );
    whole.hash.clear();
    assert_eq!(
        String::from_utf8(split).unwrap(),
        serde_json::to_string(&whole).unwrap()
    );
    // With a traffic note (a member only records steered by a route have), too.
    input.decision = DecisionKind::Fault;
    input.traffic = Some(crate::TrafficNote {
        route: Some("orders-canary".into()),
        backend: Some("north/version=v2".into()),
        fault: Some("abort 503".into()),
        ..Default::default()
    });
    let prepared = record::prepare(&input).unwrap();
    let mut split = Vec::new();
    record::body(43, GENESIS_HASH, &prepared, &mut split);
    let mut whole = DecisionRecord::new(input, 43, GENESIS_HASH.to_owned(), prepared.id.clone());
    whole.hash.clear();
    let text = String::from_utf8(split).unwrap();
    assert_eq!(text, serde_json::to_string(&whole).unwrap());
    assert!(text.ends_with(r#","traffic":{"route":"orders-canary","backend":"north/version=v2","fault":"abort 503"}}"#), "{text}");
    let back: DecisionRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(back.traffic, whole.traffic);
}

#[test]
fn an_edited_record_is_named() {
    let (d, log) = filled(5, None);
    let (path, first, mut fr) = frames(&audit(&d));
    let i = record_frame(&fr, 3);
    let body = String::from_utf8(fr[i].1[32..].to_vec())
        .unwrap()
        .replace("\"deny\"", "\"allow\"");
    fr[i].1.truncate(32);
    fr[i].1.extend_from_slice(body.as_bytes());
    rewrite(&path, first, &fr);
    assert_eq!(
        first_bad(&log),
        (3, "record 3 does not match its hash (edited)".to_owned())
    );
}

#[test]
fn an_edited_and_rehashed_record_breaks_the_next_link_and_the_checkpoint() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled(5, Some(signer));
    let (path, first, mut fr) = frames(&audit(&d));
    let i = record_frame(&fr, 2);
    let mut rec = record::decode(&fr[i].1).unwrap();
    rec.principal = "someone-else".into();
    fr[i].1 = reencode(&mut rec);
    rewrite(&path, first, &fr);
    let report = log.verify().unwrap();
    // The signed head of record 2 (every append is its own batch here) catches it first.
    assert_eq!(report.first_bad().unwrap().seq, 2, "{report:?}");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("does not match the signed checkpoint")),
        "{report:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("does not chain to record 2")),
        "{report:?}"
    );
}

#[test]
fn a_fully_rewritten_tail_is_caught_by_the_signed_checkpoint() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled(4, Some(signer));
    // Rewrite record 4 consistently (its predecessor link stays valid).
    let (path, first, mut fr) = frames(&audit(&d));
    let i = record_frame(&fr, 4);
    let mut rec = record::decode(&fr[i].1).unwrap();
    rec.decision = DecisionKind::Allow;
    rec.errors.push("x".into());
    fr[i].1 = reencode(&mut rec);
    rewrite(&path, first, &fr);
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 4);
    assert!(
        what.contains("does not match the signed checkpoint"),
        "{what}"
    );
}

#[test]
fn a_deleted_record_is_named() {
    let (d, log) = filled(5, None);
    let (path, first, mut fr) = frames(&audit(&d));
    fr.remove(record_frame(&fr, 2));
    rewrite(&path, first, &fr);
    assert_eq!(
        first_bad(&log),
        (2, "record 2 is missing (deleted)".to_owned())
    );
}

#[test]
fn a_tail_cut_at_a_frame_boundary_needs_a_witness_and_a_cut_frame_is_noted() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled(5, Some(signer));
    let witnessed = log.checkpoint(t(100)).unwrap();
    assert_eq!(witnessed.seq, 5);
    let (path, first, mut fr) = frames(&audit(&d));
    let cut = record_frame(&fr, 4);
    fr.truncate(cut);
    rewrite(&path, first, &fr);
    // On its own the shorter log is whole (that is why peers witness heads) …
    let report = log.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.head_seq, 3);
    // … and the witnessed head names what is gone.
    assert!(witnessed.seq > report.head_seq);
    // Half a frame at the very end is an interrupted write: a note, not tampering, and the
    // next appender drops it.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 7, 7]);
    std::fs::write(&path, &bytes).unwrap();
    let report = log.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("ends inside a frame")),
        "{report:?}"
    );
}

#[test]
fn an_inserted_record_is_named() {
    let (d, log) = filled(5, None);
    let (path, first, mut fr) = frames(&audit(&d));
    // A copy of record 1 between records 2 and 3.
    let copy = fr[record_frame(&fr, 1)].clone();
    fr.insert(record_frame(&fr, 3), copy);
    rewrite(&path, first, &fr);
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 3);
    assert!(what.contains("says it is record 1"), "{what}");
}

#[test]
fn reordered_records_are_named() {
    let (d, log) = filled(5, None);
    let (path, first, mut fr) = frames(&audit(&d));
    let (a, b) = (record_frame(&fr, 2), record_frame(&fr, 3));
    fr.swap(a, b);
    rewrite(&path, first, &fr);
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 2);
    assert!(what.contains("record 2 is missing"), "{what}");
}

#[test]
fn checkpoints_are_signed_pinned_and_checked() {
    let (signer, der) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled(3, Some(signer));
    let cp = log.checkpoint(t(50)).unwrap();
    assert_eq!((cp.seq, cp.head_hash.clone()), log.head());
    assert!(cp.signature_valid());
    let all = log.checkpoints().unwrap();
    assert_eq!(all.last(), Some(&cp));
    // One at open, one per append (each append here is its own flush batch), the explicit one.
    assert!(all.len() >= 4, "{all:?}");
    assert_eq!(log.recent_checkpoints().last(), Some(&cp));
    let report = log.verify_all().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.signed_seq, Some(3));
    drop(log);

    // Another key is refused at open.
    let (other, _) = CheckpointSigner::generate().unwrap();
    assert!(matches!(
        DecisionLog::open(&audit(&d), Some(other), options()),
        Err(LogError::KeyMismatch { .. })
    ));
    // A head re-signed with another key does not pass for the pinned one.
    let (other, _) = CheckpointSigner::generate().unwrap();
    let forged = other.sign(cp.seq, &cp.head_hash, &cp.time).unwrap();
    let (path, first, mut fr) = frames(&audit(&d));
    let last_cp = fr.iter().rposition(|(k, _)| *k == KIND_CHECKPOINT).unwrap();
    fr[last_cp].1 = segment::encode_checkpoint(&forged).unwrap();
    rewrite(&path, first, &fr);
    let signer = CheckpointSigner::from_pkcs8_der(&der).unwrap();
    let log = DecisionLog::open_read_only(&audit(&d), Some(&signer)).unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 3);
    assert!(what.contains("invalid signature"), "{what}");
    // Without a signer, checkpoints are refused.
    drop(log);
    assert!(matches!(
        DecisionLog::open(&audit(&d), None, options())
            .unwrap()
            .checkpoint(t(60)),
        Err(LogError::NoSigner)
    ));
}

#[test]
fn concurrent_appends_from_threads_and_async_in_both_modes() {
    for durability in [Durability::Process, Durability::Power] {
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let opts = LogOptions {
            durability,
            ..options()
        };
        let (_d, log) = filled_with(0, Some(signer), opts);
        std::thread::scope(|s| {
            for th in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..25 {
                        log.append(input(th * 100 + i)).unwrap();
                    }
                });
            }
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let log = std::sync::Arc::new(log);
        let receipts = rt.block_on(async {
            let tasks: Vec<_> = (0..40)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move { log.append_durable(&input(i)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap().unwrap());
            }
            out
        });
        let mut seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (101..=140).collect::<Vec<_>>(), "{durability:?}");
        let report = log.verify_all().unwrap();
        assert!(report.is_ok() && report.records == 140, "{report:?}");
        assert_eq!(log.failures(), 0);
    }
}

#[test]
fn power_mode_answers_only_after_the_sync() {
    let opts = LogOptions {
        durability: Durability::Power,
        ..options()
    };
    let (_d, log) = filled_with(0, None, opts);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let shared = log.shared().unwrap().clone();
    let receipt = rt.block_on(log.append_durable(&input(1))).unwrap();
    assert!(shared.synced() >= receipt.seq);
}

#[test]
fn a_record_is_in_the_file_when_process_mode_answers() {
    // A long sync interval: the answer must not wait for it, and the record must already be
    // readable by another opener (it is in the OS), which is what `kill -9` leaves behind.
    let opts = LogOptions {
        durability: Durability::Process,
        sync_interval: Duration::from_secs(3600),
        ..options()
    };
    let (d, log) = filled_with(0, None, opts);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let receipt = rt.block_on(log.append_durable(&input(1))).unwrap();
    let reader = DecisionLog::open_read_only(&audit(&d), None).unwrap();
    let stored = reader.query(&Filter::default()).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, receipt.id);
}

#[test]
fn queries_filter_and_export_is_canonical() {
    let (_d, log) = filled(9, None);
    let f = Filter {
        decision: Some(DecisionKind::Allow),
        ..Filter::default()
    };
    assert_eq!(
        log.query(&f)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [2, 4, 6, 8]
    );
    let f = Filter {
        resource: Some("svc0.shop.west".into()),
        policy: Some("p1".into()),
        ..Filter::default()
    };
    assert_eq!(
        log.query(&f)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [3, 9]
    );
    let f = Filter {
        since: Some(t(3)),
        until: Some(t(6)),
        limit: Some(2),
        ..Filter::default()
    };
    assert_eq!(
        log.query(&f)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [3, 4]
    );

    let mut out = Vec::new();
    assert_eq!(log.export_jsonl(&mut out).unwrap(), 9);
    let text = String::from_utf8(out).unwrap();
    let first = text.lines().next().unwrap();
    // The body is the line without its final `hash` member; its hash is that member.
    let (body, hash) = first.rsplit_once(",\"hash\":\"").unwrap();
    let body = format!("{body}}}");
    assert_eq!(
        hex::encode(record::hash_body(body.as_bytes())),
        hash.trim_end_matches("\"}")
    );
    // The same line as serializing the record.
    let rec = log.query(&Filter::default()).unwrap().remove(0);
    assert_eq!(first, serde_json::to_string(&rec).unwrap());
}

fn one_record_per_segment() -> LogOptions {
    LogOptions {
        segment_bytes: 1,
        ..options()
    }
}

#[test]
fn segments_roll_and_the_chain_crosses_them() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled_with(6, Some(signer), one_record_per_segment());
    assert!(segment::list(&audit(&d)).unwrap().len() >= 6);
    let report = log.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 6);
    // A whole segment removed from the middle is named.
    let segs = segment::list(&audit(&d)).unwrap();
    let third = segs.iter().find(|(first, _)| *first == 3).unwrap();
    std::fs::remove_file(&third.1).unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 3, "{what}");
    assert!(what.contains("missing"), "{what}");
}

#[test]
fn pruning_keeps_the_chain_verifiable_from_a_signed_anchor() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled_with(10, Some(signer), one_record_per_segment());
    let report = log.prune_before(t(5), t(1000)).unwrap();
    assert_eq!(report.removed, 4);
    assert_eq!(report.anchor.as_ref().unwrap().seq, 4);
    let v = log.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.first_seq, v.head_seq, v.records), (5, 10, 6));
    assert_eq!(log.append(input(11)).unwrap().seq, 11);
    assert!(log.verify().unwrap().is_ok());
    // Deleting the first retained record is still caught.
    let segs = segment::list(&audit(&d)).unwrap();
    let fifth = segs.iter().find(|(first, _)| *first == 5).unwrap();
    std::fs::remove_file(&fifth.1).unwrap();
    assert_eq!(first_bad(&log).0, 5);
}

#[test]
fn a_checkpoint_replayed_as_a_prune_anchor_is_caught() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled_with(10, Some(signer), one_record_per_segment());
    // Someone with write access to the disk (no key) deletes records 1..=4 and copies the
    // signed checkpoint of seq 4 into the anchor file.
    let cp = log
        .checkpoints()
        .unwrap()
        .into_iter()
        .find(|c| c.seq == 4)
        .unwrap();
    for (first, path) in segment::list(&audit(&d)).unwrap() {
        if first <= 4 {
            std::fs::remove_file(path).unwrap();
        }
    }
    std::fs::write(
        audit(&d).join(ANCHOR_FILE),
        serde_json::to_vec(&cp).unwrap(),
    )
    .unwrap();
    let report = log.verify().unwrap();
    assert!(
        !report.is_ok(),
        "a replayed checkpoint passed as an anchor: {report:?}"
    );
}

#[test]
fn pruning_refuses_a_log_that_does_not_verify() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (d, log) = filled_with(10, Some(signer), one_record_per_segment());
    let segs = segment::list(&audit(&d)).unwrap();
    let third = segs.iter().find(|(first, _)| *first == 3).unwrap();
    std::fs::remove_file(&third.1).unwrap();
    let before = segment::list(&audit(&d)).unwrap().len();
    let err = log.prune_before(t(5), t(1000)).unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert!(err.to_string().contains("seq 3"), "{err}");
    // Nothing was pruned.
    assert_eq!(segment::list(&audit(&d)).unwrap().len(), before);
}

#[test]
fn a_read_only_log_cannot_append() {
    let (d, log) = filled(1, None);
    drop(log);
    let ro = DecisionLog::open_read_only(&audit(&d), None).unwrap();
    assert!(matches!(ro.append(input(2)), Err(LogError::ReadOnly)));
    assert!(matches!(
        DecisionLog::open_read_only(&d.path().join("nothing"), None),
        Err(LogError::Missing(_))
    ));
}

#[test]
fn a_failed_write_refuses_the_record_and_every_later_one() {
    let (_d, log) = filled(1, None);
    // The disk is full (and the partial frame cannot be cut off a device): fail closed.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    log.shared().unwrap().writer.lock().unwrap().file = std::sync::Arc::new(full);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(rt.block_on(log.append_durable(&input(2))).is_err());
    let again = rt.block_on(log.append_durable(&input(3)));
    assert!(matches!(again, Err(LogError::Failed(_))), "{again:?}");
    assert_eq!(log.failures(), 2);
    assert_eq!(log.head().0, 1);
}

#[test]
fn records_from_decisions_keep_replay_facts_without_credentials() {
    let e = PolicyEngine::from_sources(
        &[SourceFile {
            name: "a.cedar".into(),
            text: "@id(\"all\") permit (principal, action, resource);".into(),
        }],
        None,
    )
    .unwrap();
    let f = facts(
        "spiffe://east.example/ns/shop/sa/web",
        "GET",
        "orders.shop.west",
        "/a/../b",
    );
    let d = e.decide(&f);
    let (_d, log) = filled(0, None);
    let mut input = DecisionRecordInput::from_decision(&f, &d);
    input.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
    let rec = log.append(input).unwrap();
    assert_eq!(
        (
            rec.decision,
            rec.action.as_str(),
            rec.path.as_str(),
            rec.raw_path.as_str()
        ),
        (DecisionKind::Allow, "GET", "/b", "/a/../b")
    );
    assert_eq!(rec.reasons, ["all"]);
    let kept = rec.facts.as_ref().unwrap();
    assert!(kept.headers.iter().all(|(k, _)| k != "authorization"));
    let stored = log.query(&Filter::default()).unwrap().remove(0);
    assert_eq!(stored, rec);
    assert_eq!(stored.facts.unwrap().time, f.time - Duration::ZERO);
    let admin = log
        .append_admin_event("alice", "policy reload", t(9))
        .unwrap();
    assert_eq!(
        (admin.decision, admin.principal.as_str()),
        (DecisionKind::Admin, "alice")
    );
}

#[test]
fn a_sled_log_migrates_byte_for_byte() {
    // Build an old-format log: record bodies as the sled log stored them, a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(4 << 20)
        .open()
        .unwrap();
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let records = db.open_tree("audit.records").unwrap();
    let mut prev = GENESIS_HASH.to_owned();
    for seq in 1..=3u64 {
        let mut rec = DecisionRecord::new(input(seq), seq, prev.clone(), format!("id{seq}"));
        let value = record::encode(&mut rec).unwrap();
        prev = rec.hash.clone();
        records.insert(seq.to_be_bytes(), value).unwrap();
    }
    let cp = signer.sign(3, &prev, "2026-01-01T00:00:00Z").unwrap();
    db.open_tree("audit.checkpoints")
        .unwrap()
        .insert(3u64.to_be_bytes(), serde_json::to_vec(&cp).unwrap())
        .unwrap();
    db.open_tree("audit.meta")
        .unwrap()
        .insert("checkpoint_key", signer.public_key_hex().as_bytes())
        .unwrap();
    assert!(sled_log_present(&db).unwrap());
    let report = migrate_from_sled(&db, &dir.path().join("audit")).unwrap();
    assert_eq!((report.records, report.checkpoints), (3, 1));
    assert!(!sled_log_present(&db).unwrap());
    let log = DecisionLog::open_read_only(&dir.path().join("audit"), Some(&signer)).unwrap();
    let v = log.verify_all().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!(
        (v.head_seq, v.head_hash.as_str(), v.signed_seq),
        (3, prev.as_str(), Some(3))
    );
    assert_eq!(log.checkpoints().unwrap(), vec![cp]);
    // A second migration finds nothing to do and changes nothing.
    assert!(migrate_from_sled(&db, &dir.path().join("audit")).is_err());
}

#[test]
fn the_disk_budget_refuses_appends_until_pruned() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        segment_bytes: 2048,
        max_disk_bytes: Some(16 * 1024),
        ..options()
    };
    let log = DecisionLog::open(dir.path(), Some(signer), opts).unwrap();
    let (used, budget) = log.disk_usage().unwrap();
    assert_eq!(budget, Some(16 * 1024));
    assert!(used > 0);
    // Strangers' records fill it: at the budget appends fail, and nothing was written past it.
    let mut refused = None;
    for i in 0..1000 {
        match log.append(input(i)) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the budget stops appends");
    assert!(matches!(refused, LogError::OverBudget { .. }), "{refused}");
    assert!(
        refused.to_string().contains("audit.max_disk_mib"),
        "{refused}"
    );
    let on_disk = || -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    // The sync thread may still add a checkpoint: poll until the count and the files agree.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (used, on_disk) = loop {
        let (used, files) = (log.disk_usage().unwrap().0, on_disk());
        if used == files || std::time::Instant::now() > deadline {
            break (used, files);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(used, on_disk, "the count follows the files");
    assert!(on_disk <= 16 * 1024 + 1024, "{on_disk}");
    // A console view is not an operator's command: it may not use the reserve.
    assert!(matches!(
        log.append_view_event("viewer", "console view /decisions", SystemTime::now()),
        Err(LogError::OverBudget { .. })
    ));
    // The operator's commands are recorded before they run: an admin event still fits (the
    // reserve past the budget), so `audit prune` itself works on a full log; traffic does not.
    log.append_admin_event("uid:0 (root)", "audit prune before …", SystemTime::now())
        .unwrap();
    assert!(matches!(
        log.append(input(4000)),
        Err(LogError::OverBudget { .. })
    ));
    // Not sticky: pruning the old segments makes room again.
    let report = log
        .prune_before(
            SystemTime::now() + Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    assert!(report.segments > 0);
    assert!(log.disk_usage().unwrap().0 < used);
    log.append(input(5000)).unwrap();
}

#[test]
fn hashes_at_knows_the_head_whatever_segments_it_skips() {
    // One record per segment: asking for record 2 skips the segments after it, and the last
    // segment may hold no record yet; the head is still the last record written.
    let (_d, log) = filled_with(6, None, one_record_per_segment());
    let found = log
        .hashes_at(&std::collections::BTreeSet::from([2]))
        .unwrap();
    assert_eq!(found.head_seq, 6);
    assert_eq!(found.hashes.len(), 1);
    let found = log.hashes_at(&std::collections::BTreeSet::new()).unwrap();
    assert_eq!(found.head_seq, 6);
}

#[test]
fn secret_looking_header_values_never_reach_a_record() {
    let mut f = facts(
        "spiffe://east.example/ns/shop/sa/web",
        "GET",
        "orders.shop.west",
        "/",
    );
    f.headers = vec![
        ("x-api-key".into(), "sk_live_123".into()),
        ("X-Auth-Token".into(), "t0k".into()),
        ("x-amz-security-token".into(), "aws".into()),
        ("x-request-id".into(), "r-1".into()),
    ];
    let e = PolicyEngine::from_sources(
        &[SourceFile {
            name: "a.cedar".into(),
            text: "@id(\"all\") permit (principal, action, resource);".into(),
        }],
        None,
    )
    .unwrap();
    let input = DecisionRecordInput::from_decision(&f, &e.decide(&f));
    let kept = input.facts.unwrap().headers;
    assert_eq!(
        kept,
        [
            ("x-api-key".to_owned(), record::REDACTED.to_owned()),
            ("X-Auth-Token".to_owned(), record::REDACTED.to_owned()),
            (
                "x-amz-security-token".to_owned(),
                record::REDACTED.to_owned()
            ),
            ("x-request-id".to_owned(), "r-1".to_owned()),
        ]
    );
}
