//! A gateway's identity (docs/DESIGN.md section 11, "Gateway identity"): the stable id
//! (`serve --gateway-id`, default `gw-<host>-<port>`) names its results subject and its durable
//! results consumer, so that a restarted gateway reads what its earlier process left there; the
//! incarnation (start time and pid) makes every batch id unique across restarts. Gateways
//! announce `ID INCARNATION` every second; one that hears its id from another live incarnation
//! reports it (`/healthz` 503): two live gateways with one id would split its results.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use parking_lot::Mutex;

use super::streams::{GATEWAY_HEARTBEAT, HEARTBEAT_EVERY};
use crate::error::{Error, Result};

/// The longest gateway id.
pub const MAX_ID: usize = 64;

/// Checks that `id` is usable as a NATS subject token and consumer name: 1 to 64 of
/// `A-Z a-z 0-9 _ -`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "--gateway-id {id:?}: use 1 to {MAX_ID} of A-Z a-z 0-9 _ -"
        )))
    }
}

/// The default id of a gateway listening on `listen`: `gw-<host name>-<port>` (the host name
/// from the kernel, else `$HOSTNAME`, else `localhost`; characters a subject token may not
/// hold become `-`). Two gateways on one host listen on different ports, so their ids differ;
/// a gateway restarted with the same `--listen` gets its id back.
pub fn default_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_ID - 10)
        .collect();
    format!("gw-{host}-{}", listen.port())
}

/// A fresh id for a gateway given none (library use): start time and pid; it never restarts.
pub fn random_id() -> String {
    format!("gw{}", incarnation())
}

/// This process's incarnation: start time (ns, hex) and pid, e.g. `i18a2f...p4242`.
pub fn incarnation() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("i{nanos:x}p{}", std::process::id())
}

/// Another live gateway with this gateway's id: its incarnation and when it was last heard.
#[derive(Default)]
pub struct Twins(Mutex<Option<(String, Instant)>>);

impl Twins {
    /// The incarnation of another gateway heard with this id within three heartbeats.
    pub fn twin(&self) -> Option<String> {
        let t = self.0.lock();
        t.as_ref()
            .filter(|(_, at)| at.elapsed() <= 3 * HEARTBEAT_EVERY)
            .map(|(inc, _)| inc.clone())
    }
}

/// Announces `id incarnation` every [`HEARTBEAT_EVERY`] and listens for the same id from
/// another incarnation (logged as an error when first heard).
pub async fn announce(
    client: &async_nats::Client,
    id: &str,
    incarnation: &str,
) -> Result<Arc<Twins>> {
    let mut beats = client
        .subscribe(GATEWAY_HEARTBEAT)
        .await
        .map_err(|e| Error::Config(format!("NATS: subscribe: {e}")))?;
    let twins: Arc<Twins> = Arc::default();
    let (t, me) = (Arc::clone(&twins), id.to_string());
    let mine = incarnation.to_string();
    tokio::spawn(async move {
        while let Some(msg) = beats.next().await {
            let Ok(text) = std::str::from_utf8(&msg.payload) else {
                continue;
            };
            let Some((id, inc)) = text.split_once(' ') else {
                continue;
            };
            if id == me && inc != mine {
                let mut g = t.0.lock();
                if g.as_ref().is_none_or(|(i, _)| i != inc) {
                    tracing::error!(
                        "NATS gateway: another live gateway uses the id {me} (incarnation {inc}); \
                         give each gateway its own --gateway-id"
                    );
                }
                *g = Some((inc.to_string(), Instant::now()));
            }
        }
    });
    let (c, beat) = (client.clone(), format!("{id} {incarnation}"));
    tokio::spawn(async move {
        loop {
            let _ = c.publish(GATEWAY_HEARTBEAT, beat.clone().into()).await;
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    });
    Ok(twins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("gw-a_1").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65), "caf\u{e9}"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        let d = default_id("0.0.0.0:7878".parse().unwrap());
        assert!(d.starts_with("gw-") && d.ends_with("-7878"), "{d}");
        assert!(validate_id(&d).is_ok(), "{d}");
        assert!(validate_id(&random_id()).is_ok());
    }
}
