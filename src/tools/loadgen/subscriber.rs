//! A subscriber connection in one [`Role`]: records the seq, class and latency of every result,
//! `dropped` notices and the close. Slow and stalled subscribers read quickly for a moment
//! whenever the server reports a 1013 close (the `probe` signal), so that the one that was closed
//! reads its close frame within the server's close linger; a stalled one then stops again.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{connect, hello, peek_result, Hello, Ws};
use super::options::LoadgenError;
use super::stats::{gaps, key_id, now_us, parse_key, Close, ConnRecord, Role, SharedLive};
use crate::protocol::split_results;

/// Per stream: the resume points, looked up once per result (foldhash, not SipHash).
type Points = HashMap<String, [u64; 2], foldhash::fast::RandomState>;

/// One subscriber's settings.
#[derive(Debug)]
pub(crate) struct SubscriberCfg {
    pub id: usize,
    pub role: Role,
    pub url: String,
    pub streams: Vec<String>,
    /// Run start (µs, `now_us`), for the timeline.
    pub t0_us: u64,
    /// Told once every subscription is acknowledged.
    pub ready: mpsc::Sender<()>,
    /// Set when production is over: read everything left, then close.
    pub drain: watch::Receiver<bool>,
    /// Scrape time (µs) of the latest 1013 close the server counted (only with the server's
    /// `/metrics`; without them it never changes).
    pub probe: watch::Receiver<u64>,
    /// Without the server's `/metrics` there is no probe: a slow or stalled subscriber then
    /// looks for its close this often (the server's `send_timeout` plus its close linger and a margin),
    /// reading only what was produced before it looked, so that it stalls again if alive.
    pub close_check_every: Option<Duration>,
    /// Live numbers for the demo.
    pub live: Option<SharedLive>,
    /// Ask for several results per frame (PROTOCOL 4.5).
    pub batch_results: bool,
    /// Send queue size asked for per class (`hello`'s `send_queue`), if any.
    pub send_queue: Option<usize>,
}

enum Flow {
    Go,
    Closed,
}

struct Sub {
    cfg: SubscriberCfg,
    rec: ConnRecord,
    tx: SplitSink<Ws, Message>,
    rx: SplitStream<Ws>,
    /// The server epoch the points are from (0 = none yet).
    epoch: u64,
    /// Per stream: the last CRITICAL and IMPORTANT stream seq received (resume points).
    points: Points,
    /// The current socket subscribed with `resume`.
    resuming: bool,
    /// Send time (from its key) of the last result read.
    last_sent_us: Option<u64>,
}

/// Subscribe messages: plain, or resuming from `points` of `epoch` (PROTOCOL 7.4).
fn subscribes(streams: &[String], resume: Option<(u64, &Points)>) -> Vec<String> {
    streams
        .iter()
        .map(|s| {
            let mut m = serde_json::json!({"type": "subscribe", "stream": s, "id": s});
            if let Some((epoch, points)) = resume {
                let p = points.get(s).copied().unwrap_or_default();
                m["resume"] =
                    serde_json::json!({"epoch": epoch, "critical": p[0], "important": p[1]});
            }
            m.to_string()
        })
        .collect()
}

/// Receive buffer of stalled subscribers: small, so the server's sends block soon after it
/// stops reading.
const STALLED_RCVBUF: u32 = 16 * 1024;

/// Runs one subscriber until the drain completes or its connection closes.
pub(crate) async fn run_subscriber(cfg: SubscriberCfg) -> Result<ConnRecord, LoadgenError> {
    let rcvbuf = matches!(cfg.role, Role::Stalled { .. }).then_some(STALLED_RCVBUF);
    let (tx, rx) = open(
        &cfg.url,
        subscribes(&cfg.streams, None),
        rcvbuf,
        Hello {
            batch: cfg.batch_results,
            send_queue: cfg.send_queue,
        },
    )
    .await?
    .split();
    let rec = ConnRecord {
        id: cfg.id,
        ..ConnRecord::default()
    };
    let mut s = Sub {
        cfg,
        rec,
        tx,
        rx,
        epoch: 0,
        points: Points::default(),
        resuming: false,
        last_sent_us: None,
    };
    s.wait_acks().await?;
    let _ = s.cfg.ready.send(()).await;
    let role = s.cfg.role;
    match role {
        Role::Fast => s.fast().await,
        Role::Slow { per_s } => s.slow(per_s).await,
        Role::Stalled { after_s } => s.stalled(after_s).await,
        Role::Reconnect { every_s, away_s } => s.reconnect(every_s, away_s).await?,
    }
    if s.rec.close.is_none() {
        s.read_until_idle(Duration::from_millis(1500), Duration::from_secs(20))
            .await;
    }
    if s.rec.close.is_none() {
        let _ = s.tx.send(Message::Close(None)).await;
    }
    Ok(s.rec)
}

/// Connects, says hello (version 2: stream seqs) and sends `subscribes`.
async fn open(
    url: &str,
    subscribes: Vec<String>,
    rcvbuf: Option<u32>,
    asks: Hello,
) -> Result<Ws, LoadgenError> {
    let mut ws = connect(url, rcvbuf).await?;
    hello(&mut ws, 2, asks).await?;
    for m in subscribes {
        ws.send(Message::text(m)).await?;
    }
    Ok(ws)
}

impl Sub {
    /// One binary result: its seq, stream seq (resume points), latency and kept CRITICAL key.
    fn result(&mut self, b: &[u8], now: u64) {
        let Some(p) = peek_result(b) else {
            return;
        };
        let (seq, class, stream, key) = (p.seq, p.class, p.stream, p.key);
        self.rec.seqs.push(seq);
        self.rec.replayed += u64::from(p.replayed);
        if let (Some(ss), true) = (p.stream_seq, class < 2) {
            let si = self.cfg.streams.iter().position(|s| s == stream);
            self.rec
                .stream_seqs
                .push((si.unwrap_or(usize::MAX), class, ss));
            match self.points.get_mut(stream) {
                Some(p) => p[class] = p[class].max(ss),
                None => {
                    let mut p = [0; 2];
                    p[class] = ss;
                    self.points.insert(stream.to_string(), p);
                }
            }
        }
        if let Some((_, t)) = parse_key(key) {
            self.last_sent_us = Some(t);
            let lat = now.saturating_sub(t).min(u64::from(u32::MAX)) as u32;
            let at = (now.saturating_sub(self.cfg.t0_us) / 1000) as u32;
            self.rec.lat[class].push((at, lat));
            if let Some(l) = &self.cfg.live {
                l.lock().push(class, lat, stream);
            }
        }
        if class == 0 {
            self.rec.kept_keys.insert(key_id(stream, key));
        }
    }

    fn draining(&self) -> bool {
        *self.cfg.drain.borrow()
    }

    /// Reads until every subscription is acknowledged (10 s at most).
    async fn wait_acks(&mut self) -> Result<(), LoadgenError> {
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks < self.cfg.streams.len() {
            let m = tokio::time::timeout_at(deadline, self.rx.next())
                .await
                .map_err(|_| LoadgenError::Connect("no subscribe ack within 10 s".into()))?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["type"] == "error" {
                        return Err(LoadgenError::Connect(format!("subscribe refused: {t}")));
                    }
                    if v["type"] == "ack" && v["op"] == "subscribe" {
                        acks += 1;
                        self.acked(&v);
                    } else {
                        self.control(t.as_str());
                    }
                }
                m @ Some(Ok(Message::Binary(_))) => {
                    self.handle(m);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(LoadgenError::Connect("closed while subscribing".into())),
            }
        }
        Ok(())
    }

    /// A subscribe ack: the epoch and, without resume, the stream's current point.
    fn acked(&mut self, v: &serde_json::Value) {
        let epoch = v["epoch"].as_u64().unwrap_or(0);
        let last = v["last"].as_u64().unwrap_or(0);
        if let Some(stream) = v["stream"].as_str() {
            let p = self.points.entry(stream.to_string()).or_default();
            if !self.resuming {
                *p = [last, last];
            } else if epoch != self.epoch {
                *p = [0, 0];
            }
        }
        self.epoch = epoch;
    }

    async fn fast(&mut self) {
        loop {
            let mut drain = self.cfg.drain.clone();
            tokio::select! {
                m = self.rx.next() => if let Flow::Closed = self.handle(m) { return },
                _ = drain.changed() => return,
            }
        }
    }

    async fn slow(&mut self, per_s: f64) {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s.max(0.01)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = self.cfg.probe.clone();
        probe.mark_unchanged();
        let mut next_check = self.cfg.close_check_every.map(|d| Instant::now() + d);
        while !self.draining() {
            let mut drain = self.cfg.drain.clone();
            let check = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {
                    let mut drain2 = self.cfg.drain.clone();
                    tokio::select! {
                        m = self.rx.next() => if let Flow::Closed = self.handle(m) { return },
                        _ = drain2.changed() => return,
                    }
                }
                _ = probe.changed() => {
                    if self.quick_drain().await {
                        return;
                    }
                }
                _ = check => {
                    next_check = self.cfg.close_check_every.map(|d| Instant::now() + d);
                    if self.look_for_close().await {
                        return;
                    }
                }
                _ = drain.changed() => return,
            }
        }
    }

    async fn stalled(&mut self, after_s: f64) {
        let stop_at = Instant::now() + Duration::from_secs_f64(after_s);
        loop {
            let mut drain = self.cfg.drain.clone();
            tokio::select! {
                m = self.rx.next() => if let Flow::Closed = self.handle(m) { return },
                _ = tokio::time::sleep_until(stop_at) => break,
                _ = drain.changed() => return,
            }
        }
        let mut probe = self.cfg.probe.clone();
        probe.mark_unchanged();
        let check_every = self.cfg.close_check_every;
        loop {
            self.rec.stopped_us = Some(now_us());
            let mut drain = self.cfg.drain.clone();
            let check = async {
                match check_every {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = probe.changed() => {
                    if self.quick_drain().await {
                        return;
                    }
                }
                _ = check => {
                    if self.look_for_close().await {
                        return;
                    }
                }
                _ = drain.changed() => return,
            }
        }
    }

    /// Disconnects every `every_s` seconds for `away_s`, then reconnects and subscribes again.
    async fn reconnect(&mut self, every_s: f64, away_s: f64) -> Result<(), LoadgenError> {
        loop {
            let leave = Instant::now() + Duration::from_secs_f64(every_s);
            loop {
                let mut drain = self.cfg.drain.clone();
                tokio::select! {
                    m = self.rx.next() => if let Flow::Closed = self.handle(m) { return Ok(()) },
                    _ = tokio::time::sleep_until(leave) => break,
                    _ = drain.changed() => return Ok(()),
                }
            }
            let _ = self.tx.send(Message::Close(None)).await;
            self.read_until_idle(Duration::from_millis(200), Duration::from_secs(2))
                .await;
            let g = gaps(&self.rec);
            self.rec.segments.push(g);
            self.rec.seqs.clear();
            self.rec.announced.clear();
            self.rec.close = None;
            tokio::time::sleep(Duration::from_secs_f64(away_s)).await;
            // Come back even when the run is draining, so that what was missed is resumed.
            let msgs = subscribes(&self.cfg.streams, Some((self.epoch, &self.points)));
            let asks = Hello {
                batch: self.cfg.batch_results,
                send_queue: self.cfg.send_queue,
            };
            let (tx, rx) = open(&self.cfg.url, msgs, None, asks).await?.split();
            (self.tx, self.rx, self.resuming) = (tx, rx, true);
            self.wait_acks().await?;
            if self.draining() {
                return Ok(());
            }
        }
    }

    /// Reads whatever is buffered (until 300 ms without a message, 2 s at most); true when the
    /// connection closed.
    /// Reads what is buffered on the socket to see whether the server closed this connection
    /// (a stalled reader sees its close frame only behind the results in its buffers). Stops at
    /// the close, at the first result produced after the probe (the buffers are read through:
    /// the connection is alive, and this subscriber stalls again at once), or when idle.
    async fn quick_drain(&mut self) -> bool {
        let probe_us = *self.cfg.probe.borrow();
        self.read_through(
            Duration::from_millis(300),
            Duration::from_secs(2),
            Some(probe_us),
        )
        .await;
        if let Some(c) = &mut self.rec.close {
            c.detected_us = Some(probe_us);
            return true;
        }
        false
    }

    /// [`Sub::quick_drain`] without a probe: reads what was produced before now; true when the
    /// connection closed. When the server closed it is not known here (no scrape saw it), so
    /// the close carries no detection time.
    async fn look_for_close(&mut self) -> bool {
        let now = now_us();
        self.read_through(
            Duration::from_millis(300),
            Duration::from_secs(2),
            Some(now),
        )
        .await;
        self.rec.close.is_some()
    }

    async fn read_until_idle(&mut self, idle: Duration, cap: Duration) {
        self.read_through(idle, cap, None).await;
    }

    /// Reads until the connection closes, nothing arrives for `idle`, `cap` passes, or (with
    /// `sent_after`) a result produced after that instant has been read.
    async fn read_through(&mut self, idle: Duration, cap: Duration, sent_after: Option<u64>) {
        let end = Instant::now() + cap;
        while Instant::now() < end {
            match tokio::time::timeout(idle, self.rx.next()).await {
                Ok(m) => {
                    if let Flow::Closed = self.handle(m) {
                        return;
                    }
                    if sent_after.is_some_and(|p| self.last_sent_us.is_some_and(|t| t > p)) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn handle(
        &mut self,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Flow {
        let now = now_us();
        let close = |code, reason: String| Close {
            code,
            reason,
            seen_us: now,
            detected_us: None,
        };
        match m {
            Some(Ok(Message::Binary(b))) => match split_results(&b) {
                // Several results in one frame (PROTOCOL 4.5, `--batch-results`).
                Some(records) => records.into_iter().for_each(|r| self.result(r, now)),
                None => self.result(&b, now),
            },
            Some(Ok(Message::Text(t))) => self.control(t.as_str()),
            Some(Ok(Message::Close(f))) => {
                self.rec.close = Some(match f {
                    Some(f) => close(Some(u16::from(f.code)), f.reason.to_string()),
                    None => close(None, "close without a code".into()),
                });
                return Flow::Closed;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                self.rec.close = Some(close(None, e.to_string()));
                return Flow::Closed;
            }
            None => {
                self.rec.close = Some(close(None, "ended without a close frame".into()));
                return Flow::Closed;
            }
        }
        Flow::Go
    }

    fn control(&mut self, t: &str) {
        let v: serde_json::Value = serde_json::from_str(t).unwrap_or_default();
        if v["type"] != "notice" {
            return;
        }
        match v["kind"].as_str() {
            Some("dropped") => {
                let class = match v["class"].as_str() {
                    Some("critical") => 0,
                    Some("important") => 1,
                    _ => 2,
                };
                for r in v["ranges"].as_array().into_iter().flatten() {
                    if let (Some(a), Some(b)) = (r[0].as_u64(), r[1].as_u64()) {
                        self.rec.announced.push((class, a, b));
                    }
                }
            }
            Some("unrecoverable") => {
                let stream = v["stream"].as_str().unwrap_or("").to_string();
                let class = usize::from(v["class"] != "critical");
                let (first, last) = (v["first"].as_u64().unwrap_or(0), v["last"].as_u64());
                if let Some(l) = last {
                    let point = &mut self.points.entry(stream.clone()).or_default()[class];
                    *point = (*point).max(l);
                }
                let si = self.cfg.streams.iter().position(|s| *s == stream);
                self.rec
                    .unrecoverable
                    .push((si.unwrap_or(usize::MAX), class, first, last));
            }
            _ => {}
        }
    }
}
