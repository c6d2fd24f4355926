//! Scrapes the server's Prometheus `/metrics` while the load runs: process RSS and its peak,
//! per-class queue depth, drops, 1013 closes and per-device numbers, as a timeline.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::options::LoadgenError;
use super::stats::now_us;

/// One scrape.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Scrape {
    /// ms since the run start.
    pub t_ms: u64,
    /// Process RSS, MiB (`fusion_process_resident_bytes`).
    pub rss_mb: Option<f64>,
    /// Process peak RSS, MiB (`fusion_process_peak_resident_bytes`).
    pub peak_rss_mb: Option<f64>,
    /// Queued messages per class, all connections (control, critical, important, bulk).
    pub queue: [f64; 4],
    /// Results dropped so far per class (same order).
    pub dropped: [f64; 4],
    /// 1013 closes so far, all reasons.
    pub overload_closes: f64,
    /// Samples in the aligner.
    pub open_samples: f64,
    /// Batches admitted by the engine and not yet at a device.
    pub pending_batches: f64,
    /// Batches at the devices (queued or running), all devices.
    pub device_in_flight: f64,
    /// Samples the devices completed so far, all devices.
    pub device_samples: f64,
    /// Per device: (state 0 healthy / 1 slow / 2 failed, queued batches, batches completed).
    pub devices: BTreeMap<String, (f64, f64, f64)>,
}

impl Scrape {
    /// Nothing in the aligner, the engine queue or at a device.
    pub fn pipeline_idle(&self) -> bool {
        self.open_samples == 0.0 && self.pending_batches == 0.0 && self.device_in_flight == 0.0
    }
}

/// Fetches `http://addr/metrics` (plain HTTP/1.1, one request).
pub async fn fetch(addr: &str) -> Result<String, LoadgenError> {
    let err = |e: &dyn std::fmt::Display| LoadgenError::Metrics(format!("{addr}: {e}"));
    let get = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| err(&e))?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.map_err(|e| err(&e))?;
        let mut body = Vec::new();
        tcp.read_to_end(&mut body).await.map_err(|e| err(&e))?;
        Ok::<_, LoadgenError>(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| err(&"no answer within 5 s"))??;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(err(&"not a 200 answer")),
    }
}

/// Label value `name="..."` of a series' label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let i = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[i..];
    Some(&rest[..rest.find('"')?])
}

const CLASS_ORDER: [&str; 4] = ["control", "critical", "important", "bulk"];

/// Parses the Prometheus text of the server into a [`Scrape`].
pub fn parse(text: &str, t_ms: u64) -> Scrape {
    let mut s = Scrape {
        t_ms,
        ..Scrape::default()
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        let class =
            || label(labels, "class").and_then(|c| CLASS_ORDER.iter().position(|x| *x == c));
        match name {
            "fusion_process_resident_bytes" => s.rss_mb = Some(v / 1048576.0),
            "fusion_process_peak_resident_bytes" => s.peak_rss_mb = Some(v / 1048576.0),
            "fusion_server_queue_depth" => {
                if let Some(c) = class() {
                    s.queue[c] = v;
                }
            }
            "fusion_server_dropped_total" => {
                if let Some(c) = class() {
                    s.dropped[c] = v;
                }
            }
            "fusion_server_slow_consumer_total" => s.overload_closes += v,
            "fusion_server_open_samples" => s.open_samples = v,
            "fusion_engine_pending_batches" => s.pending_batches = v,
            "fusion_device_in_flight" => s.device_in_flight += v,
            "fusion_device_samples_total" => s.device_samples += v,
            "fusion_device_state" | "fusion_device_queue_depth" | "fusion_device_batches_total" => {
                if let Some(d) = label(labels, "device") {
                    let e = s.devices.entry(d.to_string()).or_default();
                    match name {
                        "fusion_device_state" => e.0 = v,
                        "fusion_device_queue_depth" => e.1 = v,
                        _ => e.2 = v,
                    }
                }
            }
            _ => {}
        }
    }
    s
}

/// Scrapes `addr` every `every` until `stop`; each time the server's count of 1013 closes
/// goes up, publishes the scrape time on `probe`. Scrape failures are skipped (counted).
pub(crate) async fn scrape_loop(
    addr: String,
    every: Duration,
    t0_us: u64,
    probe: watch::Sender<u64>,
    latest: watch::Sender<Option<Scrape>>,
    mut stop: watch::Receiver<bool>,
) -> (Vec<Scrape>, u64) {
    let mut out: Vec<Scrape> = Vec::new();
    let mut failures = 0;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        match fetch(&addr).await {
            Ok(text) => {
                let now = now_us();
                let s = parse(&text, now.saturating_sub(t0_us) / 1000);
                let before = out.last().map_or(s.overload_closes, |p| p.overload_closes);
                if s.overload_closes > before {
                    let _ = probe.send(now);
                }
                let _ = latest.send(Some(s.clone()));
                out.push(s);
            }
            Err(_) => failures += 1,
        }
    }
    // One last scrape, so the peak covers the whole run.
    if let Ok(text) = fetch(&addr).await {
        out.push(parse(&text, now_us().saturating_sub(t0_us) / 1000));
    }
    (out, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_metrics() {
        let text = "# TYPE x gauge\nfusion_process_peak_resident_bytes 104857600\n\
            fusion_server_queue_depth{class=\"bulk\"} 12\n\
            fusion_server_slow_consumer_total{reason=\"send_timeout\"} 1\n\
            fusion_server_slow_consumer_total{reason=\"slow_consumer\"} 2\n\
            fusion_device_batches_total{device=\"cpu:0\"} 40\n\
            fusion_device_state{device=\"cpu:0\"} 1\n";
        let s = parse(text, 5);
        assert_eq!(s.peak_rss_mb, Some(100.0));
        assert_eq!(s.queue, [0.0, 0.0, 0.0, 12.0]);
        assert_eq!(s.overload_closes, 3.0);
        assert_eq!(s.devices["cpu:0"], (1.0, 0.0, 40.0));
    }
}
