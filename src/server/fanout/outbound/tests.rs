//! Unit tests of the outbound queues: strict priority, drop and backpressure rules,
//! conflation, and replayed results entering the queues before live ones.

use super::*;

fn ob(crit: usize, imp: usize, bulk: usize) -> Outbound {
    let q = QueueConfig {
        critical: crit,
        important: imp,
        bulk,
        control: 10,
    };
    Outbound::new(1, &q, Duration::ZERO, 4, Arc::new(ServerMetrics::new()))
}

fn data(n: u64) -> Message {
    Message::binary(n.to_le_bytes().to_vec())
}

fn push(o: &Outbound, p: Priority, build: impl FnOnce(u64) -> Message) -> bool {
    push_kv(o, p, "s", "k", build)
}

fn push_kv(
    o: &Outbound,
    p: Priority,
    stream: &str,
    key: &str,
    build: impl FnOnce(u64) -> Message,
) -> bool {
    let s: Arc<str> = Arc::from(stream);
    let live = Live {
        priority: p,
        stream: &s,
        key,
        entry: None,
    };
    o.push_result(&live, build)
}

/// Drains everything: (class, seq) of data, and the CONTROL texts.
fn drain(o: &Outbound) -> (Vec<(usize, u64)>, Vec<String>) {
    let (mut order, mut notices) = (Vec::new(), Vec::new());
    loop {
        match o.next() {
            Next::Send(it) if it.class == CONTROL => notices.push(it.msg.to_string()),
            Next::Send(it) => order.push((it.class, it.seq)),
            _ => break,
        }
    }
    (order, notices)
}

#[test]
fn strict_priority_and_drop_rules() {
    let o = ob(2, 3, 5);
    // 10 data slots: BULK dropped once fill > 90% or its own queue (5) is full.
    for _ in 0..6 {
        push(&o, Priority::Bulk, data);
    }
    assert_eq!(o.fill().0, 5); // the 6th bulk was dropped (own queue full)
    for _ in 0..4 {
        push(&o, Priority::Important, data);
    }
    assert_eq!(o.fill().0, 8); // the 4th important dropped (own queue full)
    assert!(push(&o, Priority::Critical, data));
    assert!(push(&o, Priority::Critical, data));
    assert!(!push(&o, Priority::Bulk, data)); // fill 100% > 90%
    let (order, notices) = drain(&o);
    let classes: Vec<usize> = order.iter().map(|x| x.0).collect();
    assert_eq!(classes, vec![1, 1, 2, 2, 2, 3, 3, 3, 3, 3]);
    assert!(notices
        .iter()
        .any(|n| n.contains("\"backpressure\"") && n.contains("\"on\"")));
    let dropped: Vec<&String> = notices.iter().filter(|n| n.contains("dropped")).collect();
    assert_eq!(dropped.len(), 2, "{notices:?}");
    assert!(notices.iter().any(|n| n.contains("[[6,6],[13,13]]")));
    assert!(notices.iter().any(|n| n.contains("[[10,10]]")));
    // A third CRITICAL does not fit: close 1013.
    let o = ob(2, 3, 5);
    push(&o, Priority::Critical, data);
    push(&o, Priority::Critical, data);
    assert!(!push(&o, Priority::Critical, data));
    assert!(matches!(o.next(), Next::Close(1013, "critical_queue_full")));
}

#[test]
fn a_single_class_flow_gets_backpressure_before_any_drop() {
    // 2 + 10 + 10 = 22 data slots: 11 IMPORTANT alone never pass 70% of them.
    let o = ob(2, 10, 10);
    for _ in 0..11 {
        push(&o, Priority::Important, data);
    }
    assert_eq!(o.fill().0, 10);
    let (order, notices) = drain(&o);
    assert_eq!(order.len(), 10);
    let bp = notices.iter().position(|n| n.contains("\"backpressure\""));
    let dropped = notices.iter().position(|n| n.contains("\"dropped\""));
    assert!(bp.unwrap() < dropped.unwrap(), "{notices:?}");
    let v: serde_json::Value = serde_json::from_str(&notices[bp.unwrap()]).unwrap();
    assert_eq!(
        (
            &v["state"],
            &v["class"],
            &v["class_queued"],
            &v["class_capacity"]
        ),
        (&"on".into(), &"important".into(), &8.into(), &10.into())
    );
    assert!(notices[dropped.unwrap()].contains("[[11,11]]"));
    // Drained: the off notice came once every queue was at most half full.
    assert!(notices.iter().any(|n| n.contains("\"off\"")));
}

/// The seqs named in `dropped` notices with `reason`.
fn dropped_seqs(notices: &[String], reason: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for n in notices {
        let v: serde_json::Value = serde_json::from_str(n).unwrap();
        if v["kind"] == "dropped" && v["reason"] == reason {
            for r in v["ranges"].as_array().unwrap() {
                out.extend(r[0].as_u64().unwrap()..=r[1].as_u64().unwrap());
            }
        }
    }
    out.sort_unstable();
    out
}

#[test]
fn conflation_keeps_the_newest_per_key_or_stream_and_reports_the_rest() {
    let o = ob(2, 3, 10);
    o.set_conflate(&Arc::from("s"), Some(Conflate::Key));
    for k in ["a", "b", "a", "a", "b", "c"] {
        assert!(push_kv(&o, Priority::Bulk, "s", k, data));
    }
    // Another stream is not conflated.
    push_kv(&o, Priority::Bulk, "t", "a", data);
    push_kv(&o, Priority::Bulk, "t", "a", data);
    let (order, notices) = drain(&o);
    let seqs: Vec<u64> = order.iter().map(|x| x.1).collect();
    assert_eq!(seqs, vec![4, 5, 6, 7, 8]);
    assert_eq!(dropped_seqs(&notices, "conflated"), vec![1, 2, 3]);
    assert!(notices.iter().any(|n| n.contains("\"class\":\"bulk\"")));

    let o = ob(2, 3, 10);
    o.set_conflate(&Arc::from("s"), Some(Conflate::Stream));
    for k in ["a", "b", "c"] {
        push_kv(&o, Priority::Bulk, "s", k, data);
    }
    // CRITICAL and IMPORTANT are never conflated.
    push_kv(&o, Priority::Important, "s", "a", data);
    push_kv(&o, Priority::Important, "s", "a", data);
    let (order, notices) = drain(&o);
    assert_eq!(order, vec![(2, 4), (2, 5), (3, 3)]);
    assert_eq!(dropped_seqs(&notices, "conflated"), vec![1, 2]);
}

#[test]
fn replayed_results_go_first_and_live_ones_wait_behind_them() {
    let o = ob(2, 3, 10);
    let s: Arc<str> = Arc::from("s");
    let entry = |q: u64| {
        let key = format!("k{q}");
        let fused = [q as f32];
        let view = crate::protocol::ResultView {
            stream: &s,
            key: &key,
            priority: Priority::Important,
            mask: &[1],
            fused: &fused,
            weights: &[1.0],
            stream_seq: q,
            replayed: false,
        };
        Stored::new(&s, &view)
    };
    // 6 to replay, 3 IMPORTANT slots: the rest wait for room.
    o.queue_replay(&s, (1..=6).map(entry).collect());
    assert_eq!(o.fill().0, 3);
    let live = entry(7);
    let r = Live {
        priority: Priority::Important,
        stream: &s,
        key: "k7",
        entry: Some(&live),
    };
    assert!(o.push_result(&r, |_| unreachable!("waits behind the replay")));
    let mut got = Vec::new();
    loop {
        match o.next() {
            Next::Send(it) if it.class == CONTROL => {}
            Next::Send(it) => {
                let v: serde_json::Value = serde_json::from_str(&it.msg.to_string()).unwrap();
                let replayed = v["replayed"].as_bool().unwrap_or(false);
                got.push((it.seq, v["stream_seq"].as_u64().unwrap(), replayed));
            }
            _ => break,
        }
    }
    let want: Vec<(u64, u64, bool)> = (1..=7).map(|q| (q, q, q < 7)).collect();
    assert_eq!(got, want);
    // Done replaying: a live result goes straight to its queue again.
    let r = Live { entry: None, ..r };
    assert!(o.push_result(&r, data));
    assert_eq!(o.fill().0, 1);
}

#[test]
fn many_conflation_gaps_do_not_overflow_a_stalled_peers_control_queue() {
    // CONTROL holds 10; the writer never runs. 2 keys alternating: every replaced result is a
    // gap of its own, 256 gaps per forced notice.
    let o = ob(2, 3, 10);
    o.set_conflate(&Arc::from("s"), Some(Conflate::Key));
    for i in 0..(256 * 12) {
        let k = if i % 2 == 0 { "a" } else { "b" };
        assert!(push_kv(&o, Priority::Bulk, "s", k, data), "closed at {i}");
    }
    let (order, notices) = drain(&o);
    assert_eq!(order.len(), 2);
    let n = 256 * 12;
    let mut all = dropped_seqs(&notices, "conflated");
    all.extend(order.iter().map(|x| x.1));
    all.sort_unstable();
    assert_eq!(all, (1..=n as u64).collect::<Vec<u64>>());
}

#[test]
fn a_send_queue_asked_for_in_hello_holds_that_many_without_drops() {
    let o = ob(2, 3, 5);
    assert_eq!(o.send_queue(), [2, 3, 5]);
    // At the defaults the fourth IMPORTANT result is dropped (its queue of 3 is full).
    for _ in 0..3 {
        assert!(push(&o, Priority::Important, data));
    }
    assert!(!push(&o, Priority::Important, data));
    drain(&o);
    o.set_send_queue([2, 1000, 5]);
    assert_eq!(o.send_queue(), [2, 1000, 5]);
    assert_eq!(o.cap(CONTROL), 10, "CONTROL is not the client's to size");
    let took = (0..900)
        .filter(|_| push(&o, Priority::Important, data))
        .count();
    assert_eq!(
        took, 900,
        "900 results queued in a queue of 1000, none dropped"
    );
    let (order, _) = drain(&o);
    assert_eq!(order.iter().filter(|(c, _)| *c == 2).count(), 900);
    // Shrunk below what it holds: it keeps it, takes nothing more until below.
    for _ in 0..10 {
        push(&o, Priority::Important, data);
    }
    o.set_send_queue([2, 4, 5]);
    assert!(!push(&o, Priority::Important, data));
    // Zero is never a capacity.
    o.set_send_queue([0, 0, 0]);
    assert_eq!(o.send_queue(), [1, 1, 1]);
}

#[test]
fn queue_depth_gauges_lag_by_less_than_a_step_and_are_exact_when_idle() {
    let o = ob(1000, 1000, 1000);
    let depth = |c: usize| o.m.queue_depth[c].get();
    for n in 1..=200u64 {
        push(&o, Priority::Important, data);
        let lag = n as f64 - depth(2);
        assert!(
            (0.0..DEPTH_STEP as f64).contains(&lag),
            "{n} queued, gauge {}",
            depth(2)
        );
    }
    for _ in 0..150 {
        assert!(matches!(o.next(), Next::Send(_)));
    }
    let lag = depth(2) - 50.0;
    assert!(
        (0.0..DEPTH_STEP as f64).contains(&lag),
        "gauge {}",
        depth(2)
    );
    // Emptied: exact.
    let (order, _) = drain(&o);
    assert_eq!(order.len(), 50);
    assert_eq!(depth(2), 0.0);
    // What a finished connection still held leaves the gauge too.
    for _ in 0..70 {
        push(&o, Priority::Bulk, data);
    }
    assert!(depth(3) > 0.0);
    o.finish();
    assert_eq!(depth(3), 0.0);
}
