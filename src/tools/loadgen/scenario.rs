//! The named scenarios: who produces at what rate, who subscribes how, and on which devices an
//! in-process server runs them.

use std::fmt;
use std::str::FromStr;

use super::stats::Role;

/// A named load scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Producers at the target rate, fast subscribers.
    Steady,
    /// Producers as fast as the server reads them: they outrun the devices (given 20 ms of
    /// injected latency per batch, so that they do on any machine).
    Flood,
    /// `steady` plus two subscribers reading 10 messages/s and one that stops reading.
    SlowConsumer,
    /// `steady` on two CPU devices, one with 50 ms of injected latency per batch.
    SlowDevice,
    /// `steady` plus subscribers that disconnect and come back.
    Reconnect,
}

impl Scenario {
    /// Every scenario, in documentation order.
    pub const ALL: [Scenario; 5] = [
        Scenario::Steady,
        Scenario::Flood,
        Scenario::SlowConsumer,
        Scenario::SlowDevice,
        Scenario::Reconnect,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Flood => "flood",
            Scenario::SlowConsumer => "slow-consumer",
            Scenario::SlowDevice => "slow-device",
            Scenario::Reconnect => "reconnect",
        }
    }

    /// The plan at `rate` samples/s in all (ignored by `flood`).
    pub fn plan(self, rate: f64) -> Plan {
        let half = Some(rate / 2.0);
        let mut p = Plan {
            name: self.name().to_string(),
            producers: vec![half, half],
            subscribers: vec![Role::Fast, Role::Fast],
            split_streams: false,
            devices: "cpu".into(),
        };
        match self {
            Scenario::Steady => {}
            Scenario::Flood => {
                p.producers = vec![None; 4];
                p.subscribers = vec![Role::Fast];
                // The devices must be the bottleneck whatever the machine: with the head at
                // full speed, a fast CPU fuses what four producers can push through the
                // WebSockets and nothing overflows (seen on an idle 2-core VM). 20 ms per batch
                // caps them at about 12,000 samples/s.
                p.devices = "cpu:delay=20ms".into();
            }
            Scenario::SlowConsumer => p.subscribers.extend([
                Role::Slow { per_s: 10.0 },
                Role::Slow { per_s: 10.0 },
                Role::Stalled { after_s: 2.0 },
            ]),
            Scenario::SlowDevice => {
                p.devices = "cpu:threads=1,cpu:threads=1:delay=50ms".into();
            }
            Scenario::Reconnect => p.subscribers.extend([
                Role::Reconnect {
                    every_s: 3.0,
                    away_s: 1.0,
                },
                Role::Reconnect {
                    every_s: 2.0,
                    away_s: 0.5,
                },
            ]),
        }
        p
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Scenario, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|x| x.name()).collect();
                format!("unknown scenario {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Who does what in one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Name in the report.
    pub name: String,
    /// One entry per producer connection: its rate in samples/s, `None` = flood. Producer `p`
    /// produces into stream `lg-<p>`.
    pub producers: Vec<Option<f64>>,
    /// One entry per subscriber connection (each subscribes to every producer's stream, unless
    /// `split_streams`).
    pub subscribers: Vec<Role>,
    /// The fast subscribers share the streams out between them (fast subscriber `k` of `n`
    /// reads streams `k`, `k + n`, ...) instead of each reading every stream: one consumer per
    /// stream, as a coordinator's workers would, so that one connection does not carry every
    /// result.
    pub split_streams: bool,
    /// Devices of an in-process server (`cpu`, `cpu,cpu:delay=50ms`, ...).
    pub devices: String,
}

impl Plan {
    /// Runs `other`'s producers and subscribers beside these (devices stay these).
    pub fn absorb(&mut self, other: Plan) {
        self.name = format!("{}+{}", self.name, other.name);
        self.producers.extend(other.producers);
        self.subscribers.extend(other.subscribers);
    }

    /// Replaces the fast subscribers with `n` of them (the others stay).
    pub fn set_fast_subscribers(&mut self, n: usize) {
        self.subscribers.retain(|r| *r != Role::Fast);
        self.subscribers
            .splice(0..0, std::iter::repeat_n(Role::Fast, n));
    }

    /// Replaces the producers with `n` of them sharing the same total rate (flooding producers
    /// stay flooding): more connections for hosts whose cores one or two cannot keep busy.
    pub fn set_producers(&mut self, n: usize) {
        let total: Option<f64> = self.producers.iter().copied().sum();
        self.producers = vec![total.map(|t| t / n.max(1) as f64); n];
    }

    /// Stream names, one per producer.
    pub fn streams(&self) -> Vec<String> {
        (0..self.producers.len())
            .map(|p| format!("lg-{p}"))
            .collect()
    }

    /// How many subscribers read as fast as they can.
    pub fn fast_subscribers(&self) -> usize {
        self.subscribers
            .iter()
            .filter(|r| **r == Role::Fast)
            .count()
    }

    /// The streams subscriber `id` subscribes to: every stream, or with `split_streams` a fast
    /// subscriber's share of them.
    pub fn subscriber_streams(&self, id: usize) -> Vec<String> {
        let all = self.streams();
        if !self.split_streams || self.subscribers.get(id) != Some(&Role::Fast) {
            return all;
        }
        let fast = self.fast_subscribers();
        let k = self.subscribers[..id]
            .iter()
            .filter(|r| **r == Role::Fast)
            .count();
        all.into_iter()
            .enumerate()
            .filter(|(j, _)| j % fast == k)
            .map(|(_, s)| s)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_streams_gives_every_stream_to_one_fast_subscriber() {
        let mut p = Scenario::SlowConsumer.plan(1000.0);
        p.set_producers(5);
        p.set_fast_subscribers(2);
        assert_eq!(p.subscriber_streams(0).len(), 5, "not split: every stream");
        p.split_streams = true;
        assert_eq!(p.subscriber_streams(0), ["lg-0", "lg-2", "lg-4"]);
        assert_eq!(p.subscriber_streams(1), ["lg-1", "lg-3"]);
        // The slow and stalled subscribers still read every stream.
        assert_eq!(p.subscriber_streams(2).len(), 5);
        assert_eq!(p.subscriber_streams(4).len(), 5);
    }

    #[test]
    fn set_producers_keeps_the_total_rate() {
        let mut p = Scenario::Steady.plan(1000.0);
        p.set_producers(4);
        assert_eq!(p.producers, vec![Some(250.0); 4]);
        assert_eq!(p.streams()[3], "lg-3");
        let mut f = Scenario::Flood.plan(1000.0);
        f.set_producers(2);
        assert_eq!(f.producers, vec![None; 2]);
    }

    #[test]
    fn names_roundtrip_and_plans_differ() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>(), Ok(s));
        }
        assert!("nope".parse::<Scenario>().is_err());
        let mut p = Scenario::Flood.plan(1000.0);
        assert_eq!(p.producers, vec![None; 4]);
        p.absorb(Scenario::SlowConsumer.plan(1000.0));
        assert_eq!(p.producers.len(), 6);
        assert_eq!(p.subscribers.len(), 6);
        assert_eq!(p.streams()[5], "lg-5");
        let mut s = Scenario::SlowConsumer.plan(1000.0);
        s.set_fast_subscribers(1);
        assert_eq!(s.subscribers.len(), 4);
        assert_eq!(s.subscribers[0], Role::Fast);
        assert_eq!(
            s.subscribers.iter().filter(|r| **r == Role::Fast).count(),
            1
        );
        assert_eq!(
            Scenario::Steady.plan(1000.0).producers,
            vec![Some(500.0); 2]
        );
    }
}
