//! Benchmarks: decisions with 10/100/1000 policies (criterion mean plus p50/p99 printed),
//! quota checks under contention from 2 threads, and durable decision-log appends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use meshgate_policy::{
    CheckpointSigner, DecisionLog, DecisionRecordInput, Durability, LogOptions, PolicyEngine,
    QuotaLimiter, QuotaResult, QuotaSpec, RequestFacts, SourceFile,
};

fn policies(n: usize) -> Vec<SourceFile> {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "@id(\"p{i}\")\n@quota(\"100/s\")\npermit (principal == Workload::\"spiffe://east.example/ns/ns{i}/sa/web\", action in Action::\"read\", resource == Service::\"svc{i}.shop.west\") when {{ context.mtls && context.path like \"/v1/*\" }};\n"
        ));
    }
    text.push_str("@id(\"no-admin\") forbid (principal, action, resource) when { context.path like \"/admin/*\" };\n");
    vec![SourceFile {
        name: "bench.cedar".into(),
        text,
    }]
}

fn facts(i: usize) -> RequestFacts {
    RequestFacts {
        caller: format!("spiffe://east.example/ns/ns{i}/sa/web"),
        service: format!("svc{i}.shop.west"),
        destination_trust_domain: "west.example".into(),
        method: "GET".into(),
        raw_path: "/v1/orders/42?x=1".into(),
        headers: vec![
            ("x-env".into(), "prod".into()),
            ("user-agent".into(), "bench".into()),
        ],
        source_cluster: "east".into(),
        destination_cluster: "west".into(),
        mtls: true,
        time: SystemTime::now(),
        claims: None,
        service_labels: BTreeMap::from([("tier".into(), "gold".into())]),
    }
}

fn percentiles(engine: &PolicyEngine, f: &RequestFacts, n: usize) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            black_box(engine.decide(f));
            t.elapsed()
        })
        .collect();
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for n in [10, 100, 1000] {
        let engine = PolicyEngine::from_sources(&policies(n), None).unwrap();
        let f = facts(n / 2);
        assert!(engine.decide(&f).allowed);
        let (p50, p99) = percentiles(&engine, &f, 5000);
        eprintln!("decide/{n} policies: p50 {p50:?}, p99 {p99:?}");
        group.bench_function(format!("{n}_policies"), |b| {
            b.iter(|| black_box(engine.decide(black_box(&f))))
        });
    }
    group.finish();
}

fn quotas(c: &mut Criterion) {
    let limiter = Arc::new(QuotaLimiter::new(None, 100_000));
    let spec: QuotaSpec = "1000000/s burst 1000".parse().unwrap();
    c.bench_function("quota_check_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let origin = start;
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (limiter, spec) = (limiter.clone(), spec.clone());
                    s.spawn(move || {
                        let key = if t == 0 { "principal-a" } else { "principal-b" };
                        for _ in 0..iters / 2 {
                            black_box(limiter.check(key, &spec, origin.elapsed()));
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
}

/// The admitted rate on the real clock under sustained overload: two threads hammer one
/// key of a 1000/s quota for 3 s; the figure to compare with the configured rate (the
/// simulated-time test in the crate proves the 5 % bound; this reports the real one).
fn quota_accuracy(_c: &mut Criterion) {
    let limiter = Arc::new(QuotaLimiter::new(None, 1000));
    let spec: QuotaSpec = "1000/s burst 10".parse().unwrap();
    let origin = Instant::now();
    let run_for = Duration::from_secs(3);
    let admitted = std::sync::atomic::AtomicU64::new(0);
    let attempts = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while origin.elapsed() < run_for {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if matches!(
                        limiter.check("shared", &spec, origin.elapsed()),
                        QuotaResult::Allowed { .. }
                    ) {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let secs = origin.elapsed().as_secs_f64();
    let admitted = admitted.into_inner() as f64;
    let rate = (admitted - 10.0) / secs;
    eprintln!(
        "quota accuracy (real clock): configured 1000/s burst 10, offered {:.0}/s, admitted {rate:.1}/s ({:+.2} %)",
        attempts.into_inner() as f64 / secs,
        (rate / 1000.0 - 1.0) * 100.0
    );
}

fn log_appends(c: &mut Criterion) {
    let engine = PolicyEngine::from_sources(&policies(10), None).unwrap();
    let f = facts(3);
    let input = DecisionRecordInput::from_decision(&f, &engine.decide(&f));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("log_append");
    group.sample_size(10);
    for durability in [Durability::Process, Durability::Power] {
        let dir = tempfile::tempdir().unwrap();
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let log = Arc::new(
            DecisionLog::open(
                dir.path(),
                Some(signer),
                LogOptions {
                    durability,
                    ..LogOptions::default()
                },
            )
            .unwrap(),
        );
        // One request at a time: the latency a request pays for its record.
        group.bench_function(format!("{durability:?}_one_at_a_time"), |b| {
            b.iter(|| rt.block_on(log.append_durable(&input)).unwrap())
        });
        // 64 requests at once (a loaded gateway): the cost per record.
        group.bench_function(format!("{durability:?}_64_concurrent"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..64)
                        .map(|_| {
                            let log = log.clone();
                            let input = input.clone();
                            tokio::spawn(async move {
                                for _ in 0..iters.div_ceil(64) {
                                    log.append_durable(&input).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decisions, quotas, quota_accuracy, log_appends);
criterion_main!(benches);
