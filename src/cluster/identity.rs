//! A gateway's identity (docs/DESIGN.md section 11, "Gateway identity"): the stable id
//! (`serve --gateway-id`, default `gw-<host>-<port>`) names its results subject and its durable
//! results consumer, so that a restarted gateway reads what its earlier process left there; the
//! incarnation (start time and pid) makes every batch id unique across restarts.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

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
