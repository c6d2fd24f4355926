//! Subscriptions: stream name -> the connections subscribed to it. Copy-on-write lists, so the
//! fan-out takes a cheap snapshot under a read lock and never holds the lock while pushing.
//! Also the `$devices` pseudo-stream: device state changes, polled from the engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use super::outbound::Outbound;
use crate::engine::Engine;
use crate::protocol::notices;

/// The pseudo-stream of device state notices.
pub(crate) const DEVICES: &str = "$devices";

type Subs = Arc<Vec<Arc<Outbound>>>;

/// Stream subscriptions of every connection.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    streams: RwLock<HashMap<Arc<str>, Subs>>,
}

impl Registry {
    /// Subscribes `out` to `stream` (idempotent).
    pub fn subscribe(&self, stream: &Arc<str>, out: &Arc<Outbound>) {
        let mut s = self.streams.write();
        let list = s.entry(Arc::clone(stream)).or_default();
        if !list.iter().any(|o| Arc::ptr_eq(o, out)) {
            let mut v: Vec<Arc<Outbound>> = list.as_ref().clone();
            v.push(Arc::clone(out));
            *list = Arc::new(v);
        }
    }

    /// Whether `out` is subscribed to `stream`.
    pub fn is_subscribed(&self, stream: &str, out: &Arc<Outbound>) -> bool {
        self.streams
            .read()
            .get(stream)
            .is_some_and(|l| l.iter().any(|o| Arc::ptr_eq(o, out)))
    }

    /// Unsubscribes; false when it was not subscribed.
    pub fn unsubscribe(&self, stream: &str, out: &Arc<Outbound>) -> bool {
        let mut s = self.streams.write();
        let Some(list) = s.get_mut(stream) else {
            return false;
        };
        if !list.iter().any(|o| Arc::ptr_eq(o, out)) {
            return false;
        }
        let v: Vec<Arc<Outbound>> = list
            .iter()
            .filter(|o| !Arc::ptr_eq(o, out))
            .cloned()
            .collect();
        if v.is_empty() {
            s.remove(stream);
        } else {
            *list = Arc::new(v);
        }
        true
    }

    /// Removes a connection from every stream in `streams`.
    pub fn remove(&self, streams: impl Iterator<Item = Arc<str>>, out: &Arc<Outbound>) {
        for st in streams {
            self.unsubscribe(&st, out);
        }
    }

    /// The subscribers of `stream` now.
    pub fn subscribers(&self, stream: &str) -> Option<Subs> {
        self.streams.read().get(stream).cloned()
    }
}

/// Polls the engine's device states and tells `$devices` subscribers about every change,
/// until `stop` fires.
pub(crate) async fn watch_devices(
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Vec<(String, &'static str)> = Vec::new();
    loop {
        let now: Vec<(String, &'static str)> = engine
            .stats()
            .devices
            .into_iter()
            .map(|d| (d.name, state_name(d.state)))
            .collect();
        if !last.is_empty() {
            if let Some(subs) = registry.subscribers(DEVICES) {
                for (name, state) in now.iter().filter(|x| !last.contains(x)) {
                    for o in subs.iter() {
                        o.push_control(notices::device(name, state));
                    }
                }
            }
        }
        last = now;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn state_name(s: crate::engine::DeviceState) -> &'static str {
    use crate::engine::DeviceState as D;
    match s {
        D::Healthy => "healthy",
        D::Slow => "slow",
        D::Failed => "failed",
    }
}
