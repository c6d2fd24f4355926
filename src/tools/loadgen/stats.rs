//! What the load generator records per connection, and the arithmetic on it: latency
//! percentiles, and the gap analysis that tells announced drops from silent losses.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Instant;

/// The three data classes, in protocol order (0 critical, 1 important, 2 bulk).
pub const CLASSES: [&str; 3] = ["critical", "important", "bulk"];

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the first call in this process (the clock every key timestamp uses, so
/// producers and subscribers in one process agree).
pub fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Key of sample `i` of class `class` sent at `t_us`: `<c|i|b><i>.<t_us>`. Any subscriber can
/// compute the produce-to-result latency and the class from the key alone.
pub fn make_key(class: usize, i: u64, t_us: u64) -> String {
    let c = ["c", "i", "b"][class.min(2)];
    format!("{c}{i}.{t_us}")
}

/// The class and send time encoded by [`make_key`]; `None` for foreign keys.
pub fn parse_key(key: &str) -> Option<(usize, u64)> {
    let class = match key.as_bytes().first()? {
        b'c' => 0,
        b'i' => 1,
        b'b' => 2,
        _ => return None,
    };
    let t = key.rsplit_once('.')?.1.parse().ok()?;
    Some((class, t))
}

/// The role of a subscriber connection.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads as fast as it can.
    Fast,
    /// Reads `per_s` messages per second.
    Slow {
        /// Messages per second.
        per_s: f64,
    },
    /// Reads normally, then stops reading after `after_s` seconds.
    Stalled {
        /// Seconds after the start.
        after_s: f64,
    },
    /// Disconnects every `every_s` seconds for `away_s` seconds, then resumes.
    Reconnect {
        /// Seconds between departures.
        every_s: f64,
        /// Seconds away.
        away_s: f64,
    },
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    /// Close code; `None` when the connection ended without a close frame.
    pub code: Option<u16>,
    /// Close reason.
    pub reason: String,
    /// When the client read it (µs, [`now_us`]).
    pub seen_us: u64,
    /// When the load generator first saw the server count a 1013 close for it (µs): the
    /// scrape time, at most one scrape interval after the close. `None` when not observed.
    pub detected_us: Option<u64>,
}

impl Close {
    /// `N` of a `"<why> last_seq=N"` reason.
    pub fn last_seq(&self) -> Option<u64> {
        self.reason.rsplit_once("last_seq=")?.1.trim().parse().ok()
    }

    /// True for a close the server initiated for overload (1013).
    pub fn is_overload(&self) -> bool {
        self.code == Some(1013)
    }
}

/// Everything one subscriber connection saw (one [`Role`], possibly several sockets for
/// reconnecting subscribers; seqs are then per socket, see `segments`).
#[derive(Debug, Default)]
pub struct ConnRecord {
    /// Index among the subscribers.
    pub id: usize,
    /// Seqs received on the current socket.
    pub seqs: Vec<u64>,
    /// Per class: (ms since the run start, latency µs) of each result.
    pub lat: [Vec<(u32, u32)>; 3],
    /// [`key_id`] of every CRITICAL result received (a `String` and SipHash per result were a
    /// visible share of the load generator's CPU).
    pub kept_keys: HashSet<u64, foldhash::fast::RandomState>,
    /// Announced drops: (class, first seq, last seq).
    pub announced: Vec<(usize, u64, u64)>,
    /// The close, if the server closed it (or it broke).
    pub close: Option<Close>,
    /// When it last stopped reading (stalled subscribers).
    pub stopped_us: Option<u64>,
    /// Earlier sockets of a reconnecting subscriber, analysed on their own.
    pub segments: Vec<GapStats>,
    /// (stream index in the plan, class, stream seq) of every CRITICAL and IMPORTANT result,
    /// in arrival order, possibly repeated (a hash set per result cost ~8% of the load
    /// generator's CPU; the report sorts them once: [`missing_stream_seqs`]).
    pub stream_seqs: Vec<(usize, usize, u64)>,
    /// `unrecoverable` notices: (stream index, class, first, last; `None` = open-ended).
    pub unrecoverable: Vec<(usize, usize, u64, Option<u64>)>,
    /// Results the server replayed after a resume.
    pub replayed: u64,
}

/// Gap analysis of one socket: which seqs never arrived, and whether each was announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GapStats {
    /// Seqs announced in `dropped` notices, per class.
    pub announced: [u64; 3],
    /// Seqs that never arrived and were announced, per class (the class of the notice).
    pub gaps: [u64; 3],
    /// Seqs announced as dropped that did arrive (a server bug if non-zero).
    pub announced_but_received: u64,
    /// Seqs that never arrived, were not announced, and the server closed the connection
    /// (covered by the close reason's last_seq).
    pub lost_with_close: u64,
    /// Seqs that never arrived, were not announced, on a connection not closed by the
    /// server: silent losses (must be 0).
    pub unannounced: u64,
}

impl GapStats {
    /// Adds another socket's numbers.
    pub fn add(&mut self, o: &GapStats) {
        for c in 0..3 {
            self.announced[c] += o.announced[c];
            self.gaps[c] += o.gaps[c];
        }
        self.announced_but_received += o.announced_but_received;
        self.lost_with_close += o.lost_with_close;
        self.unannounced += o.unannounced;
    }
}

/// Gap analysis of the current socket of `r`. The highest seq considered is the highest one
/// received, announced or named by the close reason; every seq up to it was assigned by the
/// server (seqs start at 1 and count every result queued, PROTOCOL 7.1).
pub fn gaps(r: &ConnRecord) -> GapStats {
    let mut g = GapStats::default();
    let max_ann = r.announced.iter().map(|a| a.2).max().unwrap_or(0);
    let max_rx = r.seqs.iter().copied().max().unwrap_or(0);
    let closed = r.close.as_ref();
    let upper = max_rx
        .max(max_ann)
        .max(closed.and_then(Close::last_seq).unwrap_or(0));
    // Bounded by what this socket saw: the largest seq is at most what the server assigned.
    let n = usize::try_from(upper).unwrap_or(usize::MAX).min(1 << 30);
    // 0 = missing, 1 = received; class of announcement + 2 when announced.
    let mut got = vec![false; n + 1];
    for &s in &r.seqs {
        if let Some(x) = got.get_mut(s as usize) {
            *x = true;
        }
    }
    let mut ann = vec![u8::MAX; n + 1];
    for &(c, a, b) in &r.announced {
        for s in a..=b.min(n as u64) {
            if let Some(x) = ann.get_mut(s as usize) {
                *x = c as u8;
            }
            g.announced[c] += 1;
        }
    }
    let overload_close = closed.is_some_and(|c| c.is_overload() || c.code.is_none());
    for s in 1..=n {
        match (got[s], ann[s]) {
            (true, u8::MAX) => {}
            (true, _) => g.announced_but_received += 1,
            (false, u8::MAX) if overload_close => g.lost_with_close += 1,
            (false, u8::MAX) => g.unannounced += 1,
            (false, c) => g.gaps[c as usize] += 1,
        }
    }
    g
}

/// Live numbers of one subscriber, for the demo's view.
#[derive(Debug, Default)]
pub struct Live {
    /// Latest latencies per class, µs (the last [`Live::KEEP`]).
    pub recent: [std::collections::VecDeque<u32>; 3],
    /// Results per stream.
    pub per_stream: std::collections::BTreeMap<String, u64>,
}

impl Live {
    /// Latencies kept per class.
    pub const KEEP: usize = 2000;

    /// Records one result.
    pub fn push(&mut self, class: usize, lat_us: u32, stream: &str) {
        if let Some(q) = self.recent.get_mut(class) {
            if q.len() >= Self::KEEP {
                q.pop_front();
            }
            q.push_back(lat_us);
        }
        match self.per_stream.get_mut(stream) {
            Some(n) => *n += 1,
            None => {
                self.per_stream.insert(stream.to_string(), 1);
            }
        }
    }
}

/// Shared live numbers.
pub type SharedLive = std::sync::Arc<parking_lot::Mutex<Live>>;

/// Percentile `q` (0..1) of sorted latencies in µs, as milliseconds; `None` when empty.
pub fn percentile_ms(sorted_us: &[u32], q: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    Some(f64::from(sorted_us[i]) / 1000.0)
}

/// p50/p99/p999 of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Latency {
    /// Results measured.
    pub n: u64,
    /// Median, ms.
    pub p50: Option<f64>,
    /// 99th percentile, ms.
    pub p99: Option<f64>,
    /// 99.9th percentile, ms.
    pub p999: Option<f64>,
}

impl Latency {
    /// From unsorted latencies in µs.
    pub fn of(mut us: Vec<u32>) -> Latency {
        us.sort_unstable();
        Latency {
            n: us.len() as u64,
            p50: percentile_ms(&us, 0.5),
            p99: percentile_ms(&us, 0.99),
            p999: percentile_ms(&us, 0.999),
        }
    }
}

/// A 64-bit name of (stream, key) for the CRITICAL bookkeeping: the same in every task of the
/// process (a fixed seed), so that a subscriber's received keys and the producers' sent keys
/// compare without a `String` per result (collisions: ~n^2 / 2^65, nil for a run's keys).
pub fn key_id(stream: &str, key: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0x6675_7369_6f6e).hash_one((stream, key))
}

/// The entries of `reference` that `got` lacks, each once (both in any order, repeats allowed).
pub fn missing_stream_seqs(
    reference: &[(usize, usize, u64)],
    got: &[(usize, usize, u64)],
) -> Vec<(usize, usize, u64)> {
    let mut got = got.to_vec();
    got.sort_unstable();
    let mut want = reference.to_vec();
    want.sort_unstable();
    want.dedup();
    want.retain(|k| got.binary_search(k).is_err());
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip() {
        let k = make_key(1, 42, 123_456);
        assert_eq!(k, "i42.123456");
        assert_eq!(parse_key(&k), Some((1, 123_456)));
        assert_eq!(parse_key("frame-7"), None);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<u32> = (1..=1000).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.5), Some(500.0));
        assert_eq!(percentile_ms(&v, 0.99), Some(990.0));
        assert_eq!(percentile_ms(&v, 0.999), Some(999.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }

    #[test]
    fn gaps_tell_announced_from_silent() {
        let mut r = ConnRecord {
            seqs: vec![1, 2, 5, 7],
            announced: vec![(2, 3, 4)],
            ..ConnRecord::default()
        };
        let g = gaps(&r);
        assert_eq!(g.announced, [0, 0, 2]);
        assert_eq!(g.gaps, [0, 0, 2]);
        assert_eq!(g.unannounced, 1); // seq 6
        r.close = Some(Close {
            code: Some(1013),
            reason: "send_timeout last_seq=9".into(),
            seen_us: 0,
            detected_us: None,
        });
        let g = gaps(&r);
        assert_eq!(g.unannounced, 0);
        assert_eq!(g.lost_with_close, 3); // 6, 8, 9
        r.seqs.push(3);
        assert_eq!(gaps(&r).announced_but_received, 1);
    }

    #[test]
    fn missing_stream_seqs_lists_each_lacking_entry_once() {
        let reference = [
            (0, 0, 5),
            (0, 1, 5),
            (1, 0, 2),
            (0, 0, 5),
            (0, 0, 3),
            (2, 1, 9),
        ];
        let got = [(0, 0, 3), (2, 1, 9), (0, 0, 3), (7, 0, 1)];
        let missing = missing_stream_seqs(&reference, &got);
        assert_eq!(missing, vec![(0, 0, 5), (0, 1, 5), (1, 0, 2)]);
        assert!(missing_stream_seqs(&got, &got).is_empty());
        assert_eq!(
            missing_stream_seqs(&got, &[]),
            vec![(0, 0, 3), (2, 1, 9), (7, 0, 1)]
        );
    }

    #[test]
    fn key_ids_name_stream_and_key_together() {
        assert_eq!(key_id("s", "c10.5"), key_id("s", "c10.5"));
        let ids = [
            key_id("s", "c10.5"),
            key_id("s", "c10.6"),
            key_id("t", "c10.5"),
            key_id("s/c", "10.5"),
            key_id("s", "/c10.5"),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
