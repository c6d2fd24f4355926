//! Soak: the `flood` and `slow-consumer` scenarios together against one in-process server on
//! loopback (bounded time: 8 s of production in release, 2 s in debug, plus draining). Nothing
//! may be lost that was not announced, no CRITICAL result may be lost without a close, and the
//! process RSS (server and load generator together) stays under a fixed bound.

use std::time::Duration;

use fusion_engine::tools::in_process::run_plan;
use fusion_engine::tools::loadgen::{Options, Scenario, DEFAULT_RATE};

/// RSS bound of the whole test process, MiB.
const MAX_RSS_MB: f64 = 1024.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_and_slow_consumers_lose_nothing_silently() {
    let secs = if cfg!(debug_assertions) { 2 } else { 8 };
    let mut plan = Scenario::Flood.plan(DEFAULT_RATE);
    plan.absorb(Scenario::SlowConsumer.plan(DEFAULT_RATE));
    let opts = Options {
        duration: Duration::from_secs(secs),
        max_rss_mb: MAX_RSS_MB,
        ..Options::default()
    };
    let t = std::time::Instant::now();
    let r = run_plan(plan, &opts).await.expect("the soak runs");
    let summary = r.text();
    eprintln!("{summary}(took {:.1} s)", t.elapsed().as_secs_f64());
    let sent = r.samples_sent.critical + r.samples_sent.important + r.samples_sent.bulk;
    assert!(
        sent > 1000,
        "the producers sent only {sent} samples\n{summary}"
    );
    assert!(
        r.latency_ms.critical.n > 0,
        "no CRITICAL result arrived\n{summary}"
    );
    assert_eq!(r.gaps_seen, r.drops_announced, "{summary}");
    assert_eq!(r.gaps_unannounced, 0, "silent losses\n{summary}");
    assert_eq!(r.announced_but_received, 0, "{summary}");
    assert_eq!(r.critical_lost_without_close, 0, "{summary}");
    let rss = r
        .server_peak_rss_mb
        .expect("the server's /metrics reports its peak RSS");
    assert!(
        rss > 1.0 && rss < MAX_RSS_MB,
        "peak RSS {rss} MiB\n{summary}"
    );
    assert!(
        !r.closes.contains_key("1011"),
        "internal error close\n{summary}"
    );
    assert!(r.scrapes > 0 && r.scrape_failures == 0, "{summary}");
}
