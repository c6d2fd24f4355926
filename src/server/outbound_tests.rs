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
