//! The wire side of the Rust client: opening the WebSocket (bearer token; `wss://` through
//! rustls, trusting a CA file or the webpki roots: docs/PROTOCOL.md section 1), its writer and
//! reader tasks, and turning frames into [`Event`]s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio_rustls::rustls::{self, crypto::ring, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::Connector;

use super::event::{ClientError, ClientResult, Event};
use crate::protocol::DecodedResult as FuseResult;
use crate::protocol::{self, decode_result};

/// How [`super::Client::connect_with_options`] connects. [`Default`]: no token, the webpki
/// roots for `wss://`, binary results several to a frame (as [`super::Client::connect`]).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Sent as `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// For `wss://` URLs: trust the CA certificates in this PEM file (a self-signed server
    /// certificate, or a private CA) instead of the webpki roots. Ignored for `ws://`.
    pub ca_file: Option<PathBuf>,
    /// Binary results (else JSON).
    pub binary: bool,
    /// Binary results may come several to a frame (PROTOCOL 4.5).
    pub batch: bool,
    /// Send queue sizes asked for in `hello` (CRITICAL, IMPORTANT, BULK; PROTOCOL 2
    /// `send_queue`, capped by the server's `max_send_queue`): larger queues let a reader that
    /// falls behind for a moment catch up instead of losing results. None: the server's sizes.
    pub send_queue: Option<[usize; 3]>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            ca_file: None,
            binary: true,
            batch: true,
            send_queue: None,
        }
    }
}

/// Opens the WebSocket and starts its writer and reader tasks.
pub(super) async fn open(
    url: &str,
    token: Option<&str>,
    ca_file: Option<&Path>,
) -> ClientResult<(mpsc::Sender<Message>, mpsc::Receiver<Event>)> {
    let cerr = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
    let mut req = url.into_client_request().map_err(|e| cerr(&e))?;
    if let Some(t) = token {
        let v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| cerr(&e))?;
        req.headers_mut().insert("authorization", v);
    }
    let connector = match req.uri().scheme_str() {
        Some("wss") => Some(Connector::Rustls(tls_config(ca_file)?)),
        _ => None,
    };
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(req, Some(cfg), true, connector)
        .await
        .map_err(connect_error)?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let (ev_tx, events) = mpsc::channel::<Event>(4096);
    tokio::spawn(async move {
        // Feed what is queued into the write buffer and flush once it runs empty (or every 64
        // messages): a burst of produce frames costs a few syscalls, not one each.
        'run: while let Some(mut m) = out_rx.recv().await {
            let mut n = 0;
            loop {
                let close = matches!(m, Message::Close(_));
                if sink.feed(m).await.is_err() {
                    break 'run;
                }
                n += 1;
                if close {
                    let _ = sink.flush().await;
                    break 'run;
                }
                match out_rx.try_recv() {
                    Ok(next) if n < 64 => m = next,
                    Ok(next) => {
                        if sink.flush().await.is_err() {
                            break 'run;
                        }
                        n = 0;
                        m = next;
                    }
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut closed = (None, "connection ended without a close frame".to_string());
        while let Some(m) = stream.next().await {
            let ev = match m {
                Ok(Message::Binary(b)) if b.get(3) == Some(&protocol::KIND_RESULTS) => {
                    // Several results in one frame (PROTOCOL 4.5): one event each, in order.
                    let evs: Vec<Event> = match protocol::split_results(&b) {
                        Some(records) => records
                            .into_iter()
                            .map(|r| match decode_result(r) {
                                Some(r) => Event::Result(r),
                                None => Event::Control(json!({"type": "undecodable_binary"})),
                            })
                            .collect(),
                        None => vec![Event::Control(json!({"type": "undecodable_binary"}))],
                    };
                    for ev in evs {
                        if ev_tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(Message::Binary(b)) => match decode_result(&b) {
                    Some(r) => Event::Result(r),
                    None => Event::Control(json!({"type": "undecodable_binary"})),
                },
                Ok(Message::Text(t)) => text_event(t.as_str()),
                Ok(Message::Close(f)) => {
                    if let Some(f) = f {
                        closed = (Some(u16::from(f.code)), f.reason.to_string());
                    }
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    closed.1 = e.to_string();
                    break;
                }
            };
            if ev_tx.send(ev).await.is_err() {
                return;
            }
        }
        let _ = ev_tx
            .send(Event::Closed {
                code: closed.0,
                reason: closed.1,
            })
            .await;
    });
    Ok((tx, events))
}

/// The rustls client config for `wss://`: the CA file's certificates, or the webpki roots.
fn tls_config(ca_file: Option<&Path>) -> ClientResult<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad =
                |why: String| ClientError::Connect(format!("CA file {}: {why}", path.display()));
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no PEM CERTIFICATE block in it".to_string()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Connect(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A failed connect; an HTTP answer's text (a 401, a 503, or a TLS server telling a `ws://`
/// client to use `wss://`) is part of the message.
fn connect_error(e: WsError) -> ClientError {
    if let WsError::Http(resp) = &e {
        let body = resp.body().as_deref().map(String::from_utf8_lossy);
        if let Some(text) = body.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            return ClientError::Connect(format!("{e}: {text}"));
        }
    }
    ClientError::Connect(e.to_string())
}

fn text_event(t: &str) -> Event {
    let v: Value = match serde_json::from_str(t) {
        Ok(v) => v,
        Err(_) => return Event::Control(json!({"type": "undecodable_text", "text": t})),
    };
    match v["type"].as_str() {
        Some("error") => Event::Error {
            code: v["code"].as_str().unwrap_or("").to_string(),
            message: v["message"].as_str().unwrap_or("").to_string(),
            raw: v,
        },
        Some("result") => {
            let f32s = |k: &str| -> Vec<f32> {
                v[k].as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            Event::Result(FuseResult {
                seq: v["seq"].as_u64().unwrap_or(0),
                stream_seq: v["stream_seq"].as_u64().unwrap_or(0),
                replayed: v["replayed"].as_bool().unwrap_or(false),
                stream: v["stream"].as_str().unwrap_or("").to_string(),
                key: v["key"].as_str().unwrap_or("").to_string(),
                priority: v["priority"]
                    .as_str()
                    .and_then(protocol::priority_named)
                    .unwrap_or_default(),
                mask: v["mask"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
                    .unwrap_or_default(),
                fused: f32s("fused"),
                weights: f32s("weights"),
            })
        }
        _ => Event::Control(v),
    }
}
