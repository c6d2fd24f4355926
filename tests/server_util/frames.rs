//! Helpers of the `samples`-frame tests (`server_samples.rs`, `server_batches.rs`): random rows,
//! blocks of them, sending whole samples and collecting their results.

use std::collections::HashMap;

use fusion_engine::client::{Client, Event, FuseResult};
use fusion_engine::engine::Priority;

use super::*;

/// `n` samples of random rows for every head modality: `x[s][m]` is sample s, modality m.
pub fn rows(h: &fusion_engine::model::FusionHead, n: usize, seed: u64) -> Vec<Vec<Vec<f32>>> {
    (0..n)
        .map(|s| {
            h.modalities
                .iter()
                .enumerate()
                .map(|(i, m)| features(m.width, seed * 1000 + s as u64 * 10 + i as u64))
                .collect()
        })
        .collect()
}

/// Modality `m`'s block, `[N, width]` row-major.
pub fn block(x: &[Vec<Vec<f32>>], m: usize) -> Vec<f32> {
    x.iter().flat_map(|s| s[m].iter().copied()).collect()
}

/// Reads until every key has a result (and the ack with `id`, when given), failing on errors.
pub async fn collect(c: &mut Client, n: usize, ack_id: Option<u64>) -> HashMap<String, FuseResult> {
    let mut got = HashMap::new();
    let mut acked = ack_id.is_none();
    while got.len() < n || !acked {
        match next(c, 10.0).await {
            Event::Result(r) => {
                assert!(
                    got.insert(r.key.clone(), r).is_none(),
                    "a result came twice"
                );
            }
            Event::Control(v) if v["type"] == "ack" && v["op"] == "samples" => {
                assert_eq!(Some(v["id"].as_u64().unwrap()), ack_id);
                assert_eq!(v["samples"], n as u64);
                acked = true;
            }
            Event::Control(_) => {}
            e => panic!("unexpected {e:?}"),
        }
    }
    got
}

/// Sends `keys`' samples `x` (every head modality) as one `samples` frame into `stream`, and
/// records each key's rows in `want`.
pub async fn send_all_modalities(
    c: &mut Client,
    stream: &str,
    keys: Vec<String>,
    x: Vec<Vec<Vec<f32>>>,
    prio: Priority,
    want: &mut HashMap<String, Vec<Vec<f32>>>,
) {
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let blocks: Vec<Vec<f32>> = (0..3).map(|m| block(&x, m)).collect();
    let feats: Vec<(&str, &[f32])> = ["vision", "text", "audio"]
        .iter()
        .zip(&blocks)
        .map(|(nm, b)| (*nm, b.as_slice()))
        .collect();
    c.produce_samples(stream, &kr, &feats, prio, 0)
        .await
        .unwrap();
    for (k, xs) in keys.into_iter().zip(x) {
        want.insert(k, xs);
    }
}

/// The next `n` results in the order they arrive, failing on a result that comes twice.
pub async fn results_in_order(c: &mut Client, n: usize) -> Vec<FuseResult> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match next(c, 10.0).await {
            Event::Result(r) => {
                assert!(seen.insert(r.key.clone()), "a result came twice");
                out.push(r);
            }
            Event::Control(_) => {}
            e => panic!("unexpected {e:?}"),
        }
    }
    out
}
