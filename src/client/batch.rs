//! [`Client::fuse_batch`]: request/response for many samples at once, in `samples` frames
//! (PROTOCOL 4.4) with at most 90% of a send queue of samples unanswered, so that the server
//! never has to drop or close for a reader that takes its results one by one.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::{Client, ClientError, ClientResult, Event, FuseResult};
use crate::engine::Priority;
use crate::protocol::priority_name;

/// What one event means for the batch in flight.
enum Got {
    Result(usize, FuseResult),
    /// Refused for now (`overloaded` with `retry`, or BULK `shed`): send these rows again.
    Retry(Vec<usize>),
    Fail(ClientError),
}

/// The batch rows an `error` or `notice` names (`key`, or `keys`).
fn named_rows(v: &Value, index: &HashMap<String, usize>) -> Vec<usize> {
    let one = v.get("key").and_then(Value::as_str).into_iter();
    let many = v
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    let mut rows: Vec<usize> = one
        .chain(many)
        .filter_map(|k| index.get(k).copied())
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

impl Client {
    /// Fuses `n` samples of `stream` and returns their results in row order. `features[j]` is
    /// `(modality, rows)` with `rows` holding `n` rows of that modality back to back
    /// (row-major `[n, width]`); modalities not given are absent (masked out). Samples go in
    /// `samples` frames, at most 90% of this connection's send queue for `priority`
    /// unanswered; samples refused for saturation (`overloaded`, or `shed` for BULK) are sent
    /// again after a short pause; any other error about them ends the call with that error.
    pub async fn fuse_batch(
        &mut self,
        stream: &str,
        features: &[(&str, &[f32])],
        priority: Priority,
    ) -> ClientResult<Vec<FuseResult>> {
        let bad = |m: String| Err(ClientError::Protocol(m));
        if features.is_empty() {
            return bad("fuse_batch needs at least one modality".into());
        }
        let mut n = None;
        for (m, x) in features {
            let Some(w) = self
                .welcome
                .modalities
                .iter()
                .find(|(name, _)| name == m)
                .map(|(_, w)| *w)
            else {
                return bad(format!("the server's head has no modality \"{m}\""));
            };
            if w == 0 || x.len() % w != 0 || n.is_some_and(|n| n != x.len() / w) {
                return bad(format!(
                    "\"{m}\" holds {} values: not the same whole number of rows of width {w} as the others",
                    x.len()
                ));
            }
            n = Some(x.len() / w);
        }
        let n = n.unwrap_or(0);
        if n == 0 {
            return Ok(Vec::new());
        }
        if !self.subscribed.contains_key(stream) {
            self.subscribe(stream).await?;
        }
        let cap = self.welcome.raw["limits"]["send_queue"][priority_name(priority)]
            .as_u64()
            .unwrap_or(256) as usize;
        // At most 90% of the class queue unanswered: even if this reader stalls, every result
        // in flight fits the queue (IMPORTANT is dropped only when its queue is full, BULK above
        // 90%, PROTOCOL 7.2), so nothing is dropped and CRITICAL never closes.
        let window = (cap * 9 / 10).clamp(1, 1024);
        let chunk = (window / 4).max(1);
        self.next += 1;
        let keys: Vec<String> = (0..n)
            .map(|i| format!("fuse-{:x}-{}-{i}", self.prefix, self.next))
            .collect();
        let index: HashMap<String, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let widths: Vec<usize> = features.iter().map(|(_, x)| x.len() / n).collect();
        let mut out: Vec<Option<FuseResult>> = vec![None; n];
        let (mut sent, mut got) = (0usize, 0usize);
        let mut again: Vec<usize> = Vec::new();
        while got < n {
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let rows = std::mem::take(&mut again);
                self.send_rows(stream, &keys, features, &widths, &rows, priority)
                    .await?;
            }
            // Topped up in frames of a quarter of the window (or what is left), once that much
            // room is free: sending the row that each result makes room for as a frame of its
            // own cost the server ~7 allocations and a frame's parse per sample
            // (tests/server_alloc.rs), and this client as much.
            let room = window - (sent - got).min(window);
            if sent < n && room >= chunk.min(n - sent) {
                while sent < n && sent - got < window {
                    let upto = (sent + chunk).min(n).min(got + window);
                    let rows: Vec<usize> = (sent..upto).collect();
                    self.send_rows(stream, &keys, features, &widths, &rows, priority)
                        .await?;
                    sent = upto;
                }
            }
            let got_now = self
                .wait_for("the batch's results", |e| match e {
                    Event::Result(r) if r.stream == stream => {
                        index.get(&r.key).map(|&i| Got::Result(i, r.clone()))
                    }
                    Event::Error { code, message, raw } => {
                        let rows = named_rows(raw, &index);
                        if rows.is_empty() {
                            None
                        } else if raw["retry"] == true {
                            Some(Got::Retry(rows))
                        } else {
                            Some(Got::Fail(ClientError::Server {
                                code: code.clone(),
                                message: message.clone(),
                            }))
                        }
                    }
                    Event::Control(v) if v["type"] == "notice" && v["kind"] == "shed" => {
                        let rows = named_rows(v, &index);
                        (!rows.is_empty()).then_some(Got::Retry(rows))
                    }
                    _ => None,
                })
                .await?;
            match got_now {
                Got::Result(i, r) => {
                    if out[i].is_none() {
                        out[i] = Some(r);
                        got += 1;
                    }
                }
                Got::Retry(rows) => again.extend(rows.into_iter().filter(|&i| out[i].is_none())),
                Got::Fail(e) => return Err(e),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Sends rows `rows` (batch indices) of `features` as one samples frame.
    async fn send_rows(
        &self,
        stream: &str,
        keys: &[String],
        features: &[(&str, &[f32])],
        widths: &[usize],
        rows: &[usize],
        priority: Priority,
    ) -> ClientResult<()> {
        let names: Vec<&str> = rows.iter().map(|&i| keys[i].as_str()).collect();
        let blocks: Vec<Vec<f32>> = features
            .iter()
            .zip(widths)
            .map(|((_, x), &w)| {
                rows.iter()
                    .flat_map(|&i| x.get(i * w..(i + 1) * w).unwrap_or_default())
                    .copied()
                    .collect()
            })
            .collect();
        let feats: Vec<(&str, &[f32])> = features
            .iter()
            .zip(&blocks)
            .map(|((m, _), b)| (*m, b.as_slice()))
            .collect();
        self.produce_samples(stream, &names, &feats, priority, 0)
            .await
    }
}
