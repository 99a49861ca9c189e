//! Decision-log tests on real sled in a temp dir; tampering is done on the trees directly.

use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::engine::tests::facts;
use crate::{PolicyEngine, SourceFile};

fn db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(4 << 20)
        .open()
        .unwrap();
    (dir, db)
}

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

fn filled(n: u64, signer: Option<CheckpointSigner>) -> (tempfile::TempDir, sled::Db, DecisionLog) {
    let (dir, db) = db();
    let log = DecisionLog::open(&db, signer).unwrap();
    for i in 1..=n {
        log.append(input(i)).unwrap();
    }
    (dir, db, log)
}

fn tree(db: &sled::Db, name: &str) -> sled::Tree {
    db.open_tree(name).unwrap()
}

fn first_bad(log: &DecisionLog) -> (u64, String) {
    let report = log.verify().unwrap();
    let p = report.first_bad().expect("tampering must be found");
    (p.seq, p.what.clone())
}

#[test]
fn appends_chain_and_verify() {
    let (_d, db, log) = filled(5, None);
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
    // Reopening continues the chain.
    drop(log);
    let log = DecisionLog::open(&db, None).unwrap();
    assert_eq!(log.append(input(6)).unwrap().seq, 6);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn an_edited_record_is_named() {
    let (_d, db, log) = filled(5, None);
    let records = tree(&db, RECORDS_TREE);
    let mut v = records.get(3u64.to_be_bytes()).unwrap().unwrap().to_vec();
    let body = String::from_utf8(v[32..].to_vec())
        .unwrap()
        .replace("\"deny\"", "\"allow\"");
    v.truncate(32);
    v.extend_from_slice(body.as_bytes());
    records.insert(3u64.to_be_bytes(), v).unwrap();
    assert_eq!(
        first_bad(&log),
        (3, "record 3 does not match its hash (edited)".to_owned())
    );
}

#[test]
fn an_edited_and_rehashed_record_breaks_the_next_link_and_the_checkpoint() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (_d, db, log) = filled(5, Some(signer));
    log.checkpoint(t(100)).unwrap();
    let records = tree(&db, RECORDS_TREE);
    let mut rec = record::decode(&records.get(2u64.to_be_bytes()).unwrap().unwrap()).unwrap();
    rec.principal = "someone-else".into();
    records
        .insert(2u64.to_be_bytes(), record::encode(&mut rec).unwrap())
        .unwrap();
    let report = log.verify().unwrap();
    assert_eq!(report.first_bad().unwrap().seq, 3, "{report:?}");
    assert!(
        report.problems[0]
            .what
            .contains("does not chain to record 2")
    );
}

#[test]
fn a_fully_rewritten_tail_is_caught_by_the_signed_checkpoint() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (_d, db, log) = filled(4, Some(signer));
    log.checkpoint(t(100)).unwrap();
    // Rewrite record 4 consistently (its predecessor link stays valid).
    let records = tree(&db, RECORDS_TREE);
    let mut rec = record::decode(&records.get(4u64.to_be_bytes()).unwrap().unwrap()).unwrap();
    rec.decision = DecisionKind::Allow;
    rec.errors.push("x".into());
    records
        .insert(4u64.to_be_bytes(), record::encode(&mut rec).unwrap())
        .unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 4);
    assert!(
        what.contains("does not match the signed checkpoint"),
        "{what}"
    );
}

#[test]
fn a_deleted_record_is_named() {
    let (_d, db, log) = filled(5, None);
    tree(&db, RECORDS_TREE).remove(2u64.to_be_bytes()).unwrap();
    assert_eq!(
        first_bad(&log),
        (2, "record 2 is missing (deleted)".to_owned())
    );
}

#[test]
fn a_truncated_tail_is_named() {
    let (_d, db, log) = filled(5, None);
    let records = tree(&db, RECORDS_TREE);
    records.remove(5u64.to_be_bytes()).unwrap();
    records.remove(4u64.to_be_bytes()).unwrap();
    assert_eq!(
        first_bad(&log),
        (
            4,
            "records 4 to 5 are missing (the log was truncated)".to_owned()
        )
    );
}

#[test]
fn an_inserted_record_is_named() {
    let (_d, db, log) = filled(5, None);
    let records = tree(&db, RECORDS_TREE);
    // Shift 3..=5 up by one and put a copy of record 1 at 3.
    for seq in (3..=5u64).rev() {
        let v = records.get(seq.to_be_bytes()).unwrap().unwrap();
        records.insert((seq + 1).to_be_bytes(), v).unwrap();
    }
    let forged = records.get(1u64.to_be_bytes()).unwrap().unwrap();
    records.insert(3u64.to_be_bytes(), forged).unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 3);
    assert!(what.contains("says it is record 1"), "{what}");
}

#[test]
fn reordered_records_are_named() {
    let (_d, db, log) = filled(5, None);
    let records = tree(&db, RECORDS_TREE);
    let a = records.get(2u64.to_be_bytes()).unwrap().unwrap();
    let b = records.get(3u64.to_be_bytes()).unwrap().unwrap();
    records.insert(2u64.to_be_bytes(), b).unwrap();
    records.insert(3u64.to_be_bytes(), a).unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 2);
    assert!(what.contains("says it is record 3"), "{what}");
}

#[test]
fn checkpoints_are_signed_pinned_and_checked() {
    let (signer, der) = CheckpointSigner::generate().unwrap();
    let (_d, db, log) = filled(3, Some(signer));
    let cp = log.checkpoint(t(50)).unwrap();
    assert_eq!((cp.seq, cp.head_hash.clone()), log.head());
    assert!(cp.signature_valid());
    assert_eq!(log.checkpoints().unwrap(), vec![cp.clone()]);
    assert!(log.verify().unwrap().is_ok());
    drop(log);

    // Another key is refused at open.
    let (other, _) = CheckpointSigner::generate().unwrap();
    assert!(matches!(
        DecisionLog::open(&db, Some(other)),
        Err(LogError::KeyMismatch { .. })
    ));
    // A checkpoint re-signed with a swapped key is reported.
    let (other, _) = CheckpointSigner::generate().unwrap();
    let forged = other.sign(cp.seq, &cp.head_hash, &cp.time).unwrap();
    tree(&db, CHECKPOINTS_TREE)
        .insert(cp.seq.to_be_bytes(), serde_json::to_vec(&forged).unwrap())
        .unwrap();
    let log =
        DecisionLog::open(&db, Some(CheckpointSigner::from_pkcs8_der(&der).unwrap())).unwrap();
    let (seq, what) = first_bad(&log);
    assert_eq!(seq, 3);
    assert!(what.contains("checkpoint key"), "{what}");
    // Without a signer, checkpoints are refused.
    drop(log);
    assert!(matches!(
        DecisionLog::open(&db, None).unwrap().checkpoint(t(60)),
        Err(LogError::NoSigner)
    ));
}

#[test]
fn group_commit_from_threads_and_async() {
    let (_d, _db, log) = filled(0, None);
    std::thread::scope(|s| {
        for th in 0..4 {
            let log = &log;
            s.spawn(move || {
                for i in 0..25 {
                    log.append_batched(input(th * 100 + i)).unwrap();
                }
            });
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let recs = rt.block_on(async {
        let futs = (0..10).map(|i| log.append_durable(input(i)));
        let mut out = Vec::new();
        for f in futs {
            out.push(f.await.unwrap());
        }
        out
    });
    assert_eq!(recs.last().unwrap().seq, 110);
    let report = log.verify().unwrap();
    assert!(report.is_ok() && report.records == 110, "{report:?}");
    assert_eq!(log.failures(), 0);
}

#[test]
fn queries_filter_and_export_is_canonical() {
    let (_d, _db, log) = filled(9, None);
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
}

#[test]
fn pruning_keeps_the_chain_verifiable_from_a_signed_anchor() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (_d, db, log) = filled(10, Some(signer));
    let report = log.prune_before(t(5), t(1000)).unwrap();
    assert_eq!(report.removed, 4);
    assert_eq!(report.anchor.as_ref().unwrap().seq, 4);
    let v = log.verify().unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!((v.first_seq, v.head_seq, v.records), (5, 10, 6));
    assert_eq!(log.append(input(11)).unwrap().seq, 11);
    assert!(log.verify().unwrap().is_ok());
    // Deleting the first retained record is still caught.
    tree(&db, RECORDS_TREE).remove(5u64.to_be_bytes()).unwrap();
    assert_eq!(first_bad(&log).0, 5);
}

#[test]
fn a_checkpoint_replayed_as_a_prune_anchor_is_caught() {
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let (_d, db, log) = filled(10, Some(signer));
    // Someone with write access to the database (no key) deletes records 1..=4 and copies
    // the signed checkpoint of seq 4 into the anchor slot.
    let cp = log.checkpoints().unwrap().into_iter().find(|c| c.seq == 4);
    let cp = match cp {
        Some(cp) => cp,
        None => {
            // Make one at seq 4 the honest way first: a fresh log of 4, checkpointed.
            let (signer, _) = CheckpointSigner::generate().unwrap();
            let (_d2, _db2, small) = filled(4, Some(signer));
            small.checkpoint(t(100)).unwrap()
        }
    };
    for seq in 1..=4u64 {
        tree(&db, RECORDS_TREE).remove(seq.to_be_bytes()).unwrap();
    }
    tree(&db, "audit.meta")
        .insert("anchor", serde_json::to_vec(&cp).unwrap())
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
    let (_d, db, log) = filled(10, Some(signer));
    tree(&db, RECORDS_TREE).remove(3u64.to_be_bytes()).unwrap();
    let err = log.prune_before(t(5), t(1000)).unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
    assert!(err.to_string().contains("seq 3"), "{err}");
    // Nothing was pruned.
    assert!(
        tree(&db, RECORDS_TREE)
            .get(1u64.to_be_bytes())
            .unwrap()
            .is_some()
    );
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
    let (_d, _db, log) = filled(0, None);
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
