//! The acceptance checks of a [`Report`] and its human summary.

use std::collections::BTreeMap;

use super::report::{PerClass, Report};
use super::scenario::Plan;
use super::stats::Role;

/// The acceptance checks of issue 7 that apply to `r`.
pub(crate) fn checks(r: &Report, plan: &Plan) -> BTreeMap<String, bool> {
    let mut c = BTreeMap::new();
    let mut put = |k: &str, v: bool| {
        c.insert(k.to_string(), v);
    };
    put(
        "nothing_lost_silently",
        r.gaps_unannounced == 0
            && r.announced_but_received == 0
            && r.gaps_seen == r.drops_announced,
    );
    put(
        "critical_lost_without_close_is_0",
        r.critical_lost_without_close == 0,
    );
    if let Some(ok) = r.rss_within_bound {
        put("server_rss_within_bound", ok);
    }
    if plan
        .subscribers
        .iter()
        .any(|x| matches!(x, Role::Stalled { .. }))
    {
        let named = r
            .stalled_close_reason
            .as_deref()
            .and_then(|x| x.rsplit_once("last_seq=")?.1.trim().parse::<u64>().ok());
        // PROTOCOL 7.3: the close names the last result whose send completed; results of the
        // send in progress (at most one burst of 64 messages) may or may not have arrived.
        let read = r.stalled_last_seq_read.unwrap_or(0);
        put(
            "stalled_closed_1013_naming_its_last_seq",
            r.stalled_close_code == Some(1013)
                && named.is_some_and(|n| n <= read && read - n <= 64),
        );
        if let (Some(after), Some(st)) = (r.stalled_close_after_s, r.send_timeout_s) {
            put(
                "stalled_closed_within_send_timeout_plus_1s",
                after <= st + 1.0,
            );
        }
    }
    if plan.producers.iter().any(Option::is_none) {
        let overloaded = r.producer_errors.get("overloaded").copied().unwrap_or(0);
        put(
            "producers_got_overload_errors_and_notices",
            overloaded > 0 && r.producer_shed > 0,
        );
        put("no_crash_no_internal_close", !r.closes.contains_key("1011"));
    }
    if let Some(m) = r.missing_after_resume {
        // An IMPORTANT result dropped (and announced) on the new connection is not replayed.
        put(
            "reconnect_every_missed_result_replayed_or_unrecoverable",
            m <= r.reconnect_drops_announced,
        );
    }
    c
}

impl Report {
    /// A human summary, one fact per line.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            t,
            "loadgen {}: {:.1} s, {} producers, subscribers {}; sent critical {} important {} bulk {}",
            self.scenario, self.duration_s, self.producers, counts(&self.subscribers),
            self.samples_sent.critical, self.samples_sent.important, self.samples_sent.bulk
        );
        let _ = writeln!(
            t,
            "  {:.0} results/s per fast subscriber; offered {:.0} samples/s; devices {} samples/s",
            self.samples_per_s,
            self.offered_samples_per_s,
            self.engine_samples_per_s
                .map_or("-".into(), |x| format!("{x:.0}"))
        );
        if let Some(p) = self.host_steal_pct {
            let _ = writeln!(t, "  host CPU steal while producing: {p:.1}%");
        }
        if let Some(c) = self.process_cpu_us_per_sample {
            let _ = writeln!(t, "  process CPU per result: {c:.1} µs");
        }
        for (name, l) in [
            ("critical", &self.latency_ms.critical),
            ("important", &self.latency_ms.important),
            ("bulk", &self.latency_ms.bulk),
        ] {
            let _ = writeln!(
                t,
                "  {name:9} n {:8}  p50 {:>8} ms  p99 {:>8} ms  p999 {:>8} ms",
                l.n,
                ms(l.p50),
                ms(l.p99),
                ms(l.p999)
            );
        }
        let _ = writeln!(
            t,
            "  drops announced {}; gaps seen {}; unannounced gaps {}, lost with a close {}",
            per_class(&self.drops_announced),
            per_class(&self.gaps_seen),
            self.gaps_unannounced,
            self.lost_with_close
        );
        let _ = writeln!(
            t,
            "  closes {}{}; critical lost without close {}",
            closes(&self.closes),
            if self.overload_close_reasons.is_empty() {
                String::new()
            } else {
                format!(" (1013: {})", self.overload_close_reasons.join("; "))
            },
            self.critical_lost_without_close
        );
        let _ = writeln!(
            t,
            "  producer errors {}, shed {}, paused by the server {:.1}% of the time; server peak RSS {} MiB (bound {})",
            counts(&self.producer_errors),
            self.producer_shed,
            self.producer_paused_share * 100.0,
            ms(self.server_peak_rss_mb),
            self.max_rss_mb
        );
        if let Some(code) = self.stalled_close_code {
            let _ = writeln!(
                t,
                "  stalled subscriber: closed {code} \"{}\" after {} s (last seq read {})",
                self.stalled_close_reason.as_deref().unwrap_or(""),
                ms(self.stalled_close_after_s),
                self.stalled_last_seq_read
                    .map_or("-".to_string(), |n| n.to_string())
            );
        }
        for (k, ok) in &self.checks {
            let _ = writeln!(t, "  check {k}: {}", if *ok { "pass" } else { "FAIL" });
        }
        t
    }
}

/// `critical 0, important 3, bulk 12`.
fn per_class(p: &PerClass<u64>) -> String {
    format!(
        "critical {}, important {}, bulk {}",
        p.critical, p.important, p.bulk
    )
}

/// `fast 1, slow 1` (`none` when empty).
fn counts(m: &BTreeMap<String, impl std::fmt::Display>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    let v: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
    v.join(", ")
}

/// `4 with 1000, 1 with 1013` (`none` when empty).
fn closes(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    let v: Vec<String> = m
        .iter()
        .map(|(code, n)| format!("{n} with {code}"))
        .collect();
    v.join(", ")
}
