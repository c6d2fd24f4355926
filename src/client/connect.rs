//! Opening a [`Client`]: connect (plain or TLS, with a bearer token), the `hello`/`welcome`
//! exchange (docs/PROTOCOL.md section 2), reconnecting with resume (section 7.4), and what the
//! welcome said.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{
    resume, wire, Client, ClientResult, Conflate, ConnectOptions, Event, ResumePoint,
    SubscribeOptions, Welcome,
};
use crate::protocol;

impl Client {
    /// Connects, says hello (binary results, several to a frame: PROTOCOL 4.5) and waits for
    /// the welcome. `url` is `ws://host:port/`; `token` is sent as `Authorization: Bearer`.
    pub async fn connect(url: &str, token: Option<&str>) -> ClientResult<Client> {
        Self::connect_opts(url, token, true, true).await
    }

    /// [`Client::connect`], choosing binary or JSON results, one result per frame.
    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        binary: bool,
    ) -> ClientResult<Client> {
        Self::connect_opts(url, token, binary, false).await
    }

    /// [`Client::connect`], choosing binary or JSON results and, for binary ones, whether the
    /// server may send several in one `results` frame (`batch`; events are the same either way).
    pub async fn connect_opts(
        url: &str,
        token: Option<&str>,
        binary: bool,
        batch: bool,
    ) -> ClientResult<Client> {
        let token = token.map(str::to_string);
        let o = ConnectOptions {
            token,
            binary,
            batch,
            ca_file: None,
            send_queue: None,
        };
        Self::connect_with_options(url, &o).await
    }

    /// Connects with [`ConnectOptions`]: `url` is `ws://host:port/` or `wss://host:port/`; a
    /// `wss://` server is checked against `o.ca_file` when given (docs/PROTOCOL.md section 1).
    pub async fn connect_with_options(url: &str, o: &ConnectOptions) -> ClientResult<Client> {
        let (token, ca_file) = (o.token.clone(), o.ca_file.clone());
        let (tx, events) = wire::open(url, token.as_deref(), ca_file.as_deref()).await?;
        let (binary, batch, send_queue) = (o.binary, o.batch, o.send_queue);
        let prefix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (&tx as *const _ as u64);
        let mut c = Client {
            tx,
            events,
            backlog: VecDeque::new(),
            welcome: Welcome {
                modalities: Vec::new(),
                dim: 0,
                epoch: 0,
                raw: Value::Null,
            },
            prefix,
            next: 0,
            subscribed: HashMap::new(),
            tracker: resume::Tracker::default(),
            url: url.to_string(),
            token,
            ca_file,
            binary,
            batch: batch && binary,
            send_queue,
            timeout: Duration::from_secs(30),
        };
        c.hello().await?;
        Ok(c)
    }

    async fn hello(&mut self) -> ClientResult<()> {
        let results = if self.binary { "binary" } else { "json" };
        let mut hello = json!({"type": "hello", "version": protocol::VERSION_2, "results": results,
                           "batch_results": self.batch});
        if let Some([c, i, b]) = self.send_queue {
            hello["send_queue"] = json!({"critical": c, "important": i, "bulk": b});
        }
        self.send_text(hello.to_string()).await?;
        let w = self
            .wait_for("welcome", |e| match e {
                Event::Control(v) if v["type"] == "welcome" => Some(v.clone()),
                _ => None,
            })
            .await?;
        let modalities = w["head"]["modalities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            m["name"].as_str()?.to_string(),
                            m["width"].as_u64()? as usize,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.welcome = Welcome {
            modalities,
            dim: w["head"]["dim"].as_u64().unwrap_or(0) as usize,
            epoch: w["epoch"].as_u64().unwrap_or(0),
            raw: w,
        };
        Ok(())
    }

    /// Opens a new connection to the same server (after a close, or to replace a live one)
    /// and resubscribes every stream from where it stopped: each gets what it missed replayed,
    /// or an `unrecoverable` notice (section 7.4). Events received on the old connection and
    /// not yet read stay readable first; a `Closed` event of the old connection is dropped.
    pub async fn reconnect(&mut self) -> ClientResult<()> {
        let ca = self.ca_file.as_deref();
        let (tx, events) = wire::open(&self.url, self.token.as_deref(), ca).await?;
        let _ = self.tx.try_send(Message::Close(None));
        self.tx = tx;
        let mut old = std::mem::replace(&mut self.events, events);
        old.close();
        while let Ok(ev) = old.try_recv() {
            if !matches!(ev, Event::Closed { .. }) {
                self.tracker.see(&ev);
                self.backlog.push_back(ev);
            }
        }
        self.backlog.retain(|e| !matches!(e, Event::Closed { .. }));
        self.hello().await?;
        let streams: Vec<(String, Option<Conflate>)> = self
            .subscribed
            .iter()
            .map(|(s, c)| (s.clone(), *c))
            .collect();
        for (stream, conflate) in streams {
            let resume = self.tracker.get(&stream);
            let opts = SubscribeOptions { resume, conflate };
            self.subscribe_with(&stream, opts).await?;
        }
        Ok(())
    }

    /// Closes the connection but keeps the client (subscriptions, resume points and the
    /// events not yet read) for a later [`Client::reconnect`].
    pub async fn disconnect(&mut self) {
        let _ = self.tx.send(Message::Close(None)).await;
        let closed = |e: &Event| matches!(e, Event::Closed { .. }).then_some(());
        let _ = self.wait_for("the close", closed).await;
    }

    /// Where `stream` would resume now: the epoch and the last stream seq received of each
    /// replayed class (None when not subscribed).
    pub fn resume_point(&self, stream: &str) -> Option<ResumePoint> {
        self.tracker.get(stream)
    }

    /// The server's welcome (head modalities, D, limits).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }
}
