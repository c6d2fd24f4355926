//! Resume bookkeeping of the Rust client (docs/PROTOCOL.md section 7.4): per subscribed stream,
//! the server epoch and the last stream seq seen of each replayed class, updated from the events
//! in the order the application receives them, so that a reconnect asks for exactly what it has
//! not seen.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::event::Event;
use crate::engine::Priority;

/// Where a subscription resumes: the epoch of the server the seqs are from and the last stream
/// seq received of each replayed class (CRITICAL, IMPORTANT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumePoint {
    /// The server epoch (`welcome.epoch`, `ack.epoch`).
    pub epoch: u64,
    /// Last CRITICAL stream seq received (or announced unrecoverable).
    pub critical: u64,
    /// Last IMPORTANT stream seq received (or announced unrecoverable).
    pub important: u64,
}

impl ResumePoint {
    /// The `resume` object of a subscribe.
    pub fn to_json(&self) -> Value {
        json!({"epoch": self.epoch, "critical": self.critical, "important": self.important})
    }
}

/// Conflation of a subscription's BULK results (docs/PROTOCOL.md section 7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflate {
    /// Keep only the newest queued result per key.
    Key,
    /// Keep only the newest queued result of the stream.
    Stream,
}

impl Conflate {
    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Conflate::Key => "key",
            Conflate::Stream => "stream",
        }
    }
}

/// Options of [`super::Client::subscribe_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Resume from this point (replay what was missed).
    pub resume: Option<ResumePoint>,
    /// Conflate BULK results.
    pub conflate: Option<Conflate>,
}

/// The positions of every subscribed stream.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pos: HashMap<String, ResumePoint>,
}

impl Tracker {
    pub fn get(&self, stream: &str) -> Option<ResumePoint> {
        self.pos.get(stream).copied()
    }

    /// Before a subscribe: a resume starts from its point; a fresh subscribe from its ack.
    pub fn start(&mut self, stream: &str, resume: Option<ResumePoint>) {
        match resume {
            Some(p) => self.pos.insert(stream.to_string(), p),
            None => self.pos.remove(stream),
        };
    }

    pub fn forget(&mut self, stream: &str) {
        self.pos.remove(stream);
    }

    /// Updates the positions from one received event.
    pub fn see(&mut self, ev: &Event) {
        match ev {
            Event::Result(r) if r.stream_seq > 0 => {
                if let Some(p) = self.pos.get_mut(&r.stream) {
                    match r.priority {
                        Priority::Critical => p.critical = p.critical.max(r.stream_seq),
                        Priority::Important => p.important = p.important.max(r.stream_seq),
                        Priority::Bulk => {}
                    }
                }
            }
            Event::Control(v) if v["type"] == "ack" && v["op"] == "subscribe" => {
                let (Some(s), Some(epoch)) = (v["stream"].as_str(), v["epoch"].as_u64()) else {
                    return;
                };
                let last = v["last"].as_u64().unwrap_or(0);
                match self.pos.get_mut(s) {
                    // A resume within the same epoch: replays and live results follow.
                    Some(p) if p.epoch == epoch => {}
                    // A resume across a restart: the new server replays from its start.
                    Some(p) => {
                        *p = ResumePoint {
                            epoch,
                            critical: 0,
                            important: 0,
                        }
                    }
                    None => {
                        let p = ResumePoint {
                            epoch,
                            critical: last,
                            important: last,
                        };
                        self.pos.insert(s.to_string(), p);
                    }
                }
            }
            Event::Control(v) if v["type"] == "notice" && v["kind"] == "unrecoverable" => {
                let (Some(s), Some(last)) = (v["stream"].as_str(), v["last"].as_u64()) else {
                    return;
                };
                if let Some(p) = self.pos.get_mut(s) {
                    match v["class"].as_str() {
                        Some("critical") => p.critical = p.critical.max(last),
                        Some("important") => p.important = p.important.max(last),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}
