//! Producer flow control (docs/DESIGN.md section 5.6): the ingest side's
//! saturation, as the fill of its three bounded stages (the ingest queue between connections
//! and the pipeline, the aligner's open samples, the engine's admitted batches), turned into
//! `ingest_backpressure` notices to producers.
//!
//! Fill over [`ON`] switches ingest backpressure on: every producer that produces while it is on
//! gets one `ingest_backpressure` `on` notice (once per episode). A producer about to be refused
//! (a BULK sample shed, another refused with `overloaded`) is told first, so a producer always
//! sees the notice before its first refusal. Fill back at or under [`OFF`] switches it off and
//! every producer told `on` gets `off` (hysteresis, so the notices do not flap).

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::protocol::notices;
use crate::server::fanout::outbound::Outbound;

/// Fill above which ingest backpressure is on.
pub(crate) const ON: f64 = 0.7;
/// Fill at or below which it is off again.
pub(crate) const OFF: f64 = 0.5;

#[derive(Default)]
struct Inner {
    on: bool,
    fill: f64,
    told: Vec<(u64, Weak<Outbound>)>,
}

/// The ingest backpressure state shared by the pipeline and the connection readers.
pub(crate) struct IngestPressure {
    inner: Mutex<Inner>,
    on_gauge: metrics::Gauge,
    notices: metrics::Counter,
}

impl IngestPressure {
    pub fn new() -> IngestPressure {
        IngestPressure {
            inner: Mutex::new(Inner::default()),
            on_gauge: metrics::gauge!("fusion_server_ingest_backpressure"),
            notices: metrics::counter!("fusion_server_ingest_backpressure_notices_total"),
        }
    }

    /// Records the current fill (0..=1); switching off tells every producer that was told on.
    pub fn observe(&self, fill: f64) {
        self.update(&mut self.inner.lock(), fill);
    }

    /// A producer produced at `fill`: records it and, while backpressure is on, tells this
    /// producer `on` if it has not been told yet (one lock per produce message).
    pub fn producing(&self, fill: f64, producer: &Arc<Outbound>) {
        let mut g = self.inner.lock();
        self.update(&mut g, fill);
        if g.on {
            self.tell(&mut g, producer);
        }
    }

    /// Whether ingest backpressure is on, and the fill sampled last (`GET /status.json`).
    pub fn state(&self) -> (bool, f64) {
        let g = self.inner.lock();
        (g.on, g.fill)
    }

    fn update(&self, g: &mut Inner, fill: f64) {
        g.fill = fill;
        if !g.on && fill > ON {
            g.on = true;
            self.on_gauge.set(1.0);
            tracing::info!(fill, "ingest backpressure on");
        } else if g.on && fill <= OFF {
            g.on = false;
            self.on_gauge.set(0.0);
            tracing::info!(fill, "ingest backpressure off");
            for (_, w) in std::mem::take(&mut g.told) {
                if let Some(o) = w.upgrade() {
                    self.notices.increment(1);
                    o.push_control(notices::ingest_backpressure("off", fill));
                }
            }
        }
    }

    /// A producer is about to be refused for saturation: backpressure is on (whatever the fill
    /// sampled last) and the producer is told before the refusal is queued.
    pub fn refusing(&self, producer: &Arc<Outbound>) {
        let mut g = self.inner.lock();
        if !g.on {
            g.on = true;
            g.fill = g.fill.max(1.0);
            self.on_gauge.set(1.0);
            tracing::info!("ingest backpressure on (a producer is refused)");
        }
        self.tell(&mut g, producer);
    }

    fn tell(&self, g: &mut Inner, producer: &Arc<Outbound>) {
        if g.told.iter().any(|(id, _)| *id == producer.id) {
            return;
        }
        // Forget producers whose connection is gone, so the list stays bounded by the open
        // connections.
        g.told.retain(|(_, w)| w.strong_count() > 0);
        g.told.push((producer.id, Arc::downgrade(producer)));
        self.notices.increment(1);
        producer.push_control(notices::ingest_backpressure("on", g.fill));
    }
}
