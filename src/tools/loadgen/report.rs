//! The [`Report`] of a run (one JSON object with `--json`) and how it is built from what the
//! connections and the scraper recorded.

use std::collections::{BTreeMap, HashSet};

use super::options::Options;
use super::producer::ProducerRecord;
use super::scenario::Plan;
use super::scrape::Scrape;
use super::stats::{gaps, key_id, missing_stream_seqs, ConnRecord, GapStats, Latency, Role};

/// One value per data class.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PerClass<T> {
    /// CRITICAL.
    pub critical: T,
    /// IMPORTANT.
    pub important: T,
    /// BULK.
    pub bulk: T,
}

impl<T: Copy> PerClass<T> {
    fn from(a: [T; 3]) -> PerClass<T> {
        PerClass {
            critical: a[0],
            important: a[1],
            bulk: a[2],
        }
    }
}

/// One device as last scraped.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceReport {
    /// `healthy`, `slow` or `failed`.
    pub state: &'static str,
    /// Batches completed.
    pub batches: u64,
}

/// Everything a run measured. Latencies are produce-to-result: from just before the first
/// modality of a sample is sent to when a subscriber reads its result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Scenario (plan) name.
    pub scenario: String,
    /// Seconds from the start of production until every producer had closed (the configured
    /// duration, then 0.3 s for late errors, then the close).
    pub duration_s: f64,
    /// Producer connections.
    pub producers: usize,
    /// Subscriber connections by role.
    pub subscribers: BTreeMap<String, usize>,
    /// Samples sent per class.
    pub samples_sent: PerClass<u64>,
    /// Results per second per fast subscriber (results read / time to its last result); with
    /// split streams, the fast subscribers' sum.
    pub samples_per_s: f64,
    /// Samples sent per second, all producers (over `duration_s`).
    pub offered_samples_per_s: f64,
    /// Samples the server's devices completed per second, from the first scrape to the one
    /// that saw the final count (`fusion_device_samples_total`).
    pub engine_samples_per_s: Option<f64>,
    /// Latency per class over the fast subscribers.
    pub latency_ms: PerClass<Latency>,
    /// p99 over every class, fast subscribers.
    pub fast_p99_ms: Option<f64>,
    /// Latency per class over the slow (10 msg/s) subscribers, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_latency_ms: Option<PerClass<Latency>>,
    /// Seqs announced in `dropped` notices, per class, all subscribers.
    pub drops_announced: PerClass<u64>,
    /// Seqs that never arrived and were covered by a `dropped` notice of that class.
    pub gaps_seen: PerClass<u64>,
    /// Seqs that never arrived, unannounced, on connections the server did not close: silent
    /// losses.
    pub gaps_unannounced: u64,
    /// Seqs announced as dropped that arrived anyway.
    pub announced_but_received: u64,
    /// Seqs that never arrived, unannounced, on connections the server closed with 1013.
    pub lost_with_close: u64,
    /// Closes of every connection (producers and subscribers) by code (`none` = no close
    /// frame); the load generator's own normal closes are 1000.
    pub closes: BTreeMap<String, u64>,
    /// Reasons of the 1013 closes.
    pub overload_close_reasons: Vec<String>,
    /// CRITICAL samples accepted by the server but missing at a subscriber that was not
    /// closed by the server (must be 0).
    pub critical_lost_without_close: u64,
    /// Producer `error` messages by code.
    pub producer_errors: BTreeMap<String, u64>,
    /// Producer `shed` notices.
    pub producer_shed: u64,
    /// Share of the producers' time spent paused by the server's `ingest_backpressure`
    /// (docs/DESIGN.md section 5.6), averaged over the producers: 0 when the server never
    /// paused them. Read beside `offered_samples_per_s`: a rate offered below the one asked for
    /// with little pause is the producers' own limit.
    pub producer_paused_share: f64,
    /// Highest process peak RSS scraped from the server's `/metrics`, MiB.
    pub server_peak_rss_mb: Option<f64>,
    /// Percent of this machine's CPU time stolen by the hypervisor while the producers ran
    /// (`/proc/stat`; absent elsewhere). Latency tails and throughput of a run with high steal
    /// say more about the host than about the server.
    pub host_steal_pct: Option<f64>,
    /// With an in-process server: CPU time of the whole process (server, devices and this load
    /// generator's own connections) per result at a fast subscriber while producing, µs.
    /// Compare with `bench --devices cpu`'s `cpu_us_per_sample` (the devices alone).
    pub process_cpu_us_per_sample: Option<f64>,
    /// The RSS bound checked, MiB.
    pub max_rss_mb: f64,
    /// `server_peak_rss_mb <= max_rss_mb` (none without metrics).
    pub rss_within_bound: Option<bool>,
    /// Results the server dropped per class (its `fusion_server_dropped_total`, all
    /// connections, last scrape): drops announced into a socket that was then closed before
    /// the client read the notice count here but not in `drops_announced`.
    pub server_dropped: PerClass<f64>,
    /// Highest total queued messages per class across connections seen in a scrape.
    pub peak_queue_depth: PerClass<f64>,
    /// Devices as last scraped.
    pub devices: BTreeMap<String, DeviceReport>,
    /// slow-consumer: close code of the stalled subscriber.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_close_code: Option<u16>,
    /// slow-consumer: its close reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_close_reason: Option<String>,
    /// slow-consumer: seq of the last result it read before the close (the close reason's
    /// `last_seq` should name it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_last_seq_read: Option<u64>,
    /// slow-consumer: seconds from when it last stopped reading to the scrape that first
    /// showed the server's 1013 close (an upper bound, by one scrape interval).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_close_after_s: Option<f64>,
    /// reconnect: CRITICAL/IMPORTANT results (by stream seq) the reference fast subscriber got
    /// that a reconnecting subscriber never got and no `unrecoverable` notice named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_after_resume: Option<u64>,
    /// reconnect: `unrecoverable` notices received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrecoverable_announced: Option<u64>,
    /// reconnect: results missing at a reconnecting subscriber that a notice named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_named_unrecoverable: Option<u64>,
    /// reconnect: results marked replayed.
    pub replayed: u64,
    /// reconnect: CRITICAL+IMPORTANT drops announced (`dropped`) to reconnecting subscribers.
    pub reconnect_drops_announced: u64,
    /// The acceptance checks that apply to this run, by name.
    pub checks: BTreeMap<String, bool>,
    /// Scrapes of `/metrics`.
    pub scrapes: usize,
    /// Failed scrapes.
    pub scrape_failures: u64,
    /// The server's `send_timeout` (from its welcome), seconds.
    pub send_timeout_s: Option<f64>,
    /// The timeline behind the plot.
    #[serde(skip)]
    pub timeline: Timeline,
}

/// Data for the plot.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Per class: (ms since the start, latency µs) at the fast subscribers.
    pub latency: [Vec<(u32, u32)>; 3],
    /// Fast subscribers.
    pub fast: usize,
    /// Scrapes.
    pub scrapes: Vec<Scrape>,
}

pub(crate) struct Inputs<'a> {
    pub plan: &'a Plan,
    pub options: &'a Options,
    pub produced_s: f64,
    pub host_steal_pct: Option<f64>,
    /// Process CPU seconds while producing (in-process server only).
    pub process_cpu_s: Option<f64>,
    pub producers: Vec<ProducerRecord>,
    pub records: Vec<ConnRecord>,
    pub scrapes: Vec<Scrape>,
    pub scrape_failures: u64,
    pub send_timeout_s: Option<f64>,
}

fn role_name(r: &Role) -> &'static str {
    match r {
        Role::Fast => "fast",
        Role::Slow { .. } => "slow",
        Role::Stalled { .. } => "stalled",
        Role::Reconnect { .. } => "reconnect",
    }
}

fn close_key(code: Option<u16>) -> String {
    code.map_or_else(|| "none".to_string(), |c| c.to_string())
}

/// The producers' mean share of `produced_s` spent paused by the server (0 without producers).
fn paused_share(producers: &[ProducerRecord], produced_s: f64) -> f64 {
    if producers.is_empty() || produced_s <= 0.0 {
        return 0.0;
    }
    let paused: f64 = producers.iter().map(|p| p.paused.as_secs_f64()).sum();
    paused / (producers.len() as f64 * produced_s)
}

pub(crate) fn build(i: Inputs<'_>) -> Report {
    let roles = &i.plan.subscribers;
    let mut subscribers = BTreeMap::new();
    for r in roles {
        *subscribers.entry(role_name(r).to_string()).or_default() += 1;
    }
    let mut sent = [0u64; 3];
    let mut producer_errors = BTreeMap::new();
    let mut producer_shed = 0;
    let mut closes: BTreeMap<String, u64> = BTreeMap::new();
    // Per stream: the CRITICAL keys a subscriber of that stream must get.
    let mut expected_critical: BTreeMap<&str, HashSet<u64>> = BTreeMap::new();
    for p in &i.producers {
        for (total, n) in sent.iter_mut().zip(p.sent) {
            *total += n;
        }
        for (code, n) in &p.errors {
            *producer_errors.entry(code.clone()).or_default() += n;
        }
        producer_shed += p.shed;
        *closes
            .entry(close_key(p.close.as_ref().map_or(Some(1000), |c| c.0)))
            .or_default() += 1;
        for k in p
            .critical_sent
            .iter()
            .filter(|k| !p.critical_refused.contains(*k))
        {
            expected_critical
                .entry(p.stream.as_str())
                .or_default()
                .insert(key_id(&p.stream, k));
        }
    }
    let mut fast_lat: [Vec<u32>; 3] = Default::default();
    let mut slow_lat: [Vec<u32>; 3] = Default::default();
    let mut timeline = Timeline::default();
    let mut g = GapStats::default();
    let mut reasons = Vec::new();
    let mut critical_lost = 0u64;
    let mut rates = Vec::new();
    let mut report_stalled = None;
    let reference = i
        .records
        .iter()
        .position(|r| roles.get(r.id) == Some(&Role::Fast));
    let mut missing_after_resume = None;
    let mut unrecoverable = None;
    let mut unrecoverable_covered = None;
    let (mut replayed, mut reconnect_drops) = (0u64, 0u64);
    for r in &i.records {
        let role = roles.get(r.id).copied().unwrap_or(Role::Fast);
        for s in &r.segments {
            g.add(s);
        }
        g.add(&gaps(r));
        *closes
            .entry(close_key(r.close.as_ref().map_or(Some(1000), |c| c.code)))
            .or_default() += 1;
        let server_closed = r.close.as_ref().is_some_and(|c| c.is_overload());
        if let Some(c) = r.close.as_ref().filter(|c| c.is_overload()) {
            reasons.push(c.reason.clone());
        }
        match role {
            Role::Fast => {
                let n: usize = r.lat.iter().map(Vec::len).sum();
                let last_ms = r.lat.iter().flatten().map(|x| x.0).max().unwrap_or(0);
                if last_ms > 0 {
                    rates.push(n as f64 / (f64::from(last_ms) / 1000.0));
                }
                timeline.fast += 1;
                for ((all, tl), lat) in fast_lat.iter_mut().zip(&mut timeline.latency).zip(&r.lat) {
                    all.extend(lat.iter().map(|x| x.1));
                    tl.extend_from_slice(lat);
                }
            }
            Role::Slow { .. } => {
                for (all, lat) in slow_lat.iter_mut().zip(&r.lat) {
                    all.extend(lat.iter().map(|x| x.1));
                }
            }
            Role::Stalled { .. } => report_stalled = Some(r),
            Role::Reconnect { .. } => {
                let reference = reference.and_then(|x| i.records.get(x));
                if let Some(f) = reference {
                    let (mut missing, mut covered) = (0u64, 0u64);
                    for k in missing_stream_seqs(&f.stream_seqs, &r.stream_seqs) {
                        let named = r.unrecoverable.iter().any(|(s, c, a, b)| {
                            *s == k.0 && *c == k.1 && k.2 >= *a && b.is_none_or(|b| k.2 <= b)
                        });
                        if named {
                            covered += 1;
                        } else {
                            missing += 1;
                        }
                    }
                    *missing_after_resume.get_or_insert(0) += missing;
                    *unrecoverable_covered.get_or_insert(0) += covered;
                }
                *unrecoverable.get_or_insert(0) += r.unrecoverable.len() as u64;
                replayed += r.replayed;
                let mut own = r.segments.iter().fold(GapStats::default(), |mut a, s| {
                    a.add(s);
                    a
                });
                own.add(&gaps(r));
                reconnect_drops += own.announced[0] + own.announced[1];
            }
        }
        if !server_closed && !matches!(role, Role::Reconnect { .. }) {
            for stream in i.plan.subscriber_streams(r.id) {
                let expected = expected_critical.get(stream.as_str()).into_iter().flatten();
                critical_lost += expected.filter(|k| !r.kept_keys.contains(*k)).count() as u64;
            }
        }
    }
    let peak_rss = i
        .scrapes
        .iter()
        .filter_map(|s| s.peak_rss_mb.or(s.rss_mb))
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let mut peak_q = [0f64; 3];
    for s in &i.scrapes {
        for (peak, q) in peak_q.iter_mut().zip(&s.queue[1..]) {
            *peak = peak.max(*q);
        }
    }
    let devices = i
        .scrapes
        .last()
        .map(|s| {
            s.devices
                .iter()
                .map(|(n, d)| {
                    let state = ["healthy", "slow", "failed"][(d.0 as usize).min(2)];
                    let batches = d.2 as u64;
                    (n.clone(), DeviceReport { state, batches })
                })
                .collect()
        })
        .unwrap_or_default();
    let all_fast: Vec<u32> = fast_lat.iter().flatten().copied().collect();
    let has_slow = roles.iter().any(|r| matches!(r, Role::Slow { .. }));
    let stalled_close = report_stalled.and_then(|r| r.close.as_ref());
    Report {
        scenario: i.plan.name.clone(),
        duration_s: i.produced_s,
        producers: i.producers.len(),
        subscribers,
        samples_sent: PerClass::from(sent),
        // Split streams: each fast subscriber reads its share, so the rate is their sum.
        samples_per_s: rates.iter().sum::<f64>()
            / if i.plan.split_streams {
                1.0
            } else {
                rates.len().max(1) as f64
            },
        offered_samples_per_s: sent.iter().sum::<u64>() as f64 / i.produced_s.max(1e-9),
        engine_samples_per_s: engine_rate(&i.scrapes),
        latency_ms: PerClass::from(fast_lat.map(Latency::of)),
        fast_p99_ms: Latency::of(all_fast).p99,
        slow_latency_ms: has_slow.then(|| PerClass::from(slow_lat.map(Latency::of))),
        drops_announced: PerClass::from(g.announced),
        gaps_seen: PerClass::from(g.gaps),
        gaps_unannounced: g.unannounced,
        announced_but_received: g.announced_but_received,
        lost_with_close: g.lost_with_close,
        closes,
        overload_close_reasons: reasons,
        critical_lost_without_close: critical_lost,
        producer_errors,
        producer_shed,
        producer_paused_share: paused_share(&i.producers, i.produced_s),
        server_peak_rss_mb: peak_rss,
        host_steal_pct: i.host_steal_pct,
        process_cpu_us_per_sample: i.process_cpu_s.and_then(|c| {
            let per_s = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
            (per_s > 0.0).then(|| c * 1e6 / (per_s * i.produced_s.max(1e-9)))
        }),
        max_rss_mb: i.options.max_rss_mb,
        rss_within_bound: peak_rss.map(|p| p <= i.options.max_rss_mb),
        peak_queue_depth: PerClass::from(peak_q),
        server_dropped: PerClass::from(
            i.scrapes
                .last()
                .map_or([0.0; 3], |s| [s.dropped[1], s.dropped[2], s.dropped[3]]),
        ),
        devices,
        stalled_close_code: stalled_close.and_then(|c| c.code),
        stalled_close_reason: stalled_close.map(|c| c.reason.clone()),
        stalled_last_seq_read: report_stalled.and_then(|r| r.seqs.last().copied()),
        stalled_close_after_s: report_stalled.and_then(|r| {
            let at = r.close.as_ref()?.detected_us?;
            Some(at.saturating_sub(r.stopped_us?) as f64 / 1e6)
        }),
        missing_after_resume,
        unrecoverable_announced: unrecoverable,
        missing_named_unrecoverable: unrecoverable_covered,
        replayed,
        reconnect_drops_announced: reconnect_drops,
        scrapes: i.scrapes.len(),
        scrape_failures: i.scrape_failures,
        // Filled by the caller (`summary::checks`), which knows the plan's acceptance rules.
        checks: BTreeMap::new(),
        send_timeout_s: i.send_timeout_s,
        timeline: Timeline {
            scrapes: i.scrapes,
            ..timeline
        },
    }
}

/// Device samples per second from the first scrape to the first one that saw the final count
/// (so the idle drain at the end does not dilute it).
fn engine_rate(scrapes: &[Scrape]) -> Option<f64> {
    let (a, last) = (scrapes.first()?, scrapes.last()?);
    let b = scrapes
        .iter()
        .find(|s| s.device_samples >= last.device_samples)?;
    (b.t_ms > a.t_ms)
        .then(|| (b.device_samples - a.device_samples) / ((b.t_ms - a.t_ms) as f64 / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn paused_share_is_the_producers_mean() {
        let p = |ms: u64| ProducerRecord {
            paused: Duration::from_millis(ms),
            ..ProducerRecord::default()
        };
        assert_eq!(paused_share(&[], 5.0), 0.0);
        assert_eq!(paused_share(&[p(1000)], 0.0), 0.0);
        // 1 s and 0 s of 4 s each: 1/8.
        assert!((paused_share(&[p(1000), p(0)], 4.0) - 0.125).abs() < 1e-12);
        assert!((paused_share(&[p(4000)], 4.0) - 1.0).abs() < 1e-12);
    }
}
