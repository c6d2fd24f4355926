//! CPU accounting for measurements (Linux `/proc`; `None` elsewhere):
//! - CPU time stolen by the hypervisor while a measurement ran (`/proc/stat`, the `steal`
//!   column), so that a benchmark run disturbed by its host can be told apart from a slow one.
//!   On a shared virtual machine this is often the largest source of noise: a run that lost 30%
//!   of its CPU to the host is not comparable with one that lost nothing.
//! - CPU time this process used ([`process_cpu_s`], `/proc/self/stat`): CPU seconds per sample
//!   is a cost that host steal does not distort the way samples/s is.

/// Aggregate CPU time counters at one instant (clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticks {
    total: u64,
    steal: u64,
}

fn read_ticks() -> Option<Ticks> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(s.lines().next()?)
}

/// Parses the aggregate `cpu  user nice system idle iowait irq softirq steal ...` line.
fn parse_cpu_line(line: &str) -> Option<Ticks> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    // counted in user/nice, so the total is the first eight.
    let steal = *v.get(7)?;
    Some(Ticks {
        total: v.iter().take(8).sum(),
        steal,
    })
}

/// Measures the share of CPU time stolen between [`StealMeter::start`] and
/// [`StealMeter::percent`].
#[derive(Debug, Clone, Copy)]
pub struct StealMeter {
    start: Option<Ticks>,
}

impl StealMeter {
    /// Starts measuring now (a no-op where `/proc/stat` cannot be read).
    pub fn start() -> StealMeter {
        StealMeter {
            start: read_ticks(),
        }
    }

    /// Percent of all CPU time (every core) stolen by the host since `start`; `None` where
    /// `/proc/stat` is unavailable or no time passed.
    pub fn percent(&self) -> Option<f64> {
        let (a, b) = (self.start?, read_ticks()?);
        steal_percent(a, b)
    }
}

fn steal_percent(a: Ticks, b: Ticks) -> Option<f64> {
    let total = b.total.checked_sub(a.total)?;
    let steal = b.steal.checked_sub(a.steal)?;
    (total > 0).then(|| 100.0 * steal as f64 / total as f64)
}

/// User + system CPU seconds used by this process so far (all threads), from
/// `/proc/self/stat` (clock ticks of 1/100 s, the `USER_HZ` of every mainstream Linux ABI).
pub fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_self_stat(&s)
}

/// Measures this process's CPU seconds between [`CpuMeter::start`] and [`CpuMeter::seconds`].
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    start: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring now (a no-op where `/proc/self/stat` cannot be read).
    pub fn start() -> CpuMeter {
        CpuMeter {
            start: process_cpu_s(),
        }
    }

    /// CPU seconds used by this process since `start`; `None` where unavailable.
    pub fn seconds(&self) -> Option<f64> {
        Some(process_cpu_s()? - self.start?)
    }
}

fn parse_self_stat(s: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may contain spaces: fields after it
    // start at the last ')'. utime and stime are fields 14 and 15 (1-based), i.e. the 12th and
    // 13th after the name.
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace().skip(11);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_and_computes_the_share() {
        let a = parse_cpu_line("cpu  100 0 50 800 10 0 5 35 7 0").unwrap();
        assert_eq!(
            a,
            Ticks {
                total: 1000,
                steal: 35
            }
        );
        let b = parse_cpu_line("cpu  150 0 60 1000 10 0 5 75 9 0").unwrap();
        // 300 ticks passed, 40 of them stolen.
        let p = steal_percent(a, b).unwrap();
        assert!((p - 100.0 * 40.0 / 300.0).abs() < 1e-9, "{p}");
        assert_eq!(steal_percent(a, a), None);
        assert_eq!(steal_percent(b, a), None);
        assert!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse_cpu_line("cpu  1 2 3").is_none());
        assert!(parse_cpu_line("cpu  1 2 x 4 5 6 7 8").is_none());
    }

    #[test]
    fn parses_self_stat() {
        let line = "1234 (fusion engine) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 9 0 100 1000 50";
        assert_eq!(parse_self_stat(line), Some(3.25));
        assert_eq!(parse_self_stat("1234 (x) S 1 2"), None);
        assert_eq!(parse_self_stat("garbage"), None);
        if std::path::Path::new("/proc/self/stat").exists() {
            let a = process_cpu_s().expect("readable");
            let m = CpuMeter::start();
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < std::time::Duration::from_millis(60) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let b = process_cpu_s().expect("readable");
            // 60 ms of spinning shows as at least one 10 ms tick.
            assert!(b - a >= 0.01, "{a} -> {b}");
            assert!(m.seconds().expect("readable") >= 0.01);
        } else {
            println!("skipped the live part: no /proc/self/stat on this system");
        }
    }

    #[test]
    fn meter_reads_this_machine() {
        let m = StealMeter::start();
        std::thread::sleep(std::time::Duration::from_millis(30));
        if std::path::Path::new("/proc/stat").exists() {
            let p = m.percent().expect("/proc/stat is readable here");
            assert!((0.0..=100.0).contains(&p), "{p}");
        } else {
            println!("skipped: no /proc/stat on this system");
            assert_eq!(m.percent(), None);
        }
    }
}
