//! Engine configuration: every docs/DESIGN.md section 6 default (listed in section 10.2) in one place ([`EngineConfig`]), and the
//! device list syntax shared by the command line and config files ([`DeviceSpec`]).
//!
//! A device is written `KIND[:INDEX][:KEY=VALUE]...`, and a device list is a comma-separated
//! list of those, for example `cpu,cpu:threads=1:delay=50ms:jitter=5ms,cuda:0,wgpu:1`.
//! Options (all optional):
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | `threads` | integer | CPU worker threads of this device (CPU only; default all cores) |
//! | `instances` | integer | copies of the head on this device, each its own worker and backend (default 1; see below) |
//! | `delay` | duration | injected latency added to every batch |
//! | `jitter` | duration | extra injected latency, uniform in `[0, jitter]` |
//! | `fail` | probability | injected failure: the batch errors, the device is FAILED |
//! | `hang` | probability | injected hang: the batch sleeps `hang_for`, far past `device_timeout` |
//! | `hang_for` | duration | length of an injected hang (default 10 x `device_timeout`) |
//!
//! `instances=N` runs N workers on one device, each with its own backend (for CUDA its own
//! streams), so that one batch's host work, copies and kernel launches overlap another's
//! instead of leaving the device idle between them (docs/DESIGN.md section 6.2). Each instance
//! is a device of its own to the engine (routing, health, metrics): the first keeps the
//! device's name (`cuda:0`), the others are named `cuda:0/1`, `cuda:0/2`, ...
//!
//! Durations are `250us`, `50ms`, `2s` or `1.5s`. When the index is omitted the device gets
//! the lowest index of its kind not taken yet, so `cpu,cpu` is `cpu:0` and `cpu:1`. In a config
//! file the same strings are used: `devices = ["cpu:threads=1", "cuda:0"]`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::backend::BackendKind;
use crate::error::{Error, Result};

/// Most `instances` of one device: each holds its own copy of the head and device buffers.
pub const MAX_INSTANCES: usize = 8;

/// Injected faults of one device (see the module docs for the syntax).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSpec {
    /// Added latency per batch.
    pub delay: Duration,
    /// Extra latency per batch, uniform in `[0, jitter]`.
    pub jitter: Duration,
    /// Probability that a batch fails with a device error.
    pub fail: f64,
    /// Probability that a batch hangs for `hang_for`.
    pub hang: f64,
    /// Length of an injected hang; `None` = 10 x the engine's `device_timeout`.
    pub hang_for: Option<Duration>,
}

impl FaultSpec {
    /// True when nothing is injected.
    pub fn is_none(&self) -> bool {
        *self == FaultSpec::default()
    }
}

/// One configured device.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceSpec {
    /// Backend family.
    pub kind: BackendKind,
    /// Device index among that backend's devices; `None` = lowest free index of the kind.
    pub index: Option<usize>,
    /// CPU threads (CPU devices only).
    pub threads: Option<usize>,
    /// Workers (each with its own backend) on this one device; `1` unless given.
    pub instances: usize,
    /// Injected faults.
    pub faults: FaultSpec,
}

impl DeviceSpec {
    /// A device of `kind` with no options.
    pub fn new(kind: BackendKind, index: Option<usize>) -> DeviceSpec {
        DeviceSpec {
            kind,
            index,
            threads: None,
            instances: 1,
            faults: FaultSpec::default(),
        }
    }

    /// Parses a comma-separated device list.
    pub fn parse_list(s: &str) -> Result<Vec<DeviceSpec>> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(DeviceSpec::from_str)
            .collect()
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        let bad = |why: String| Error::Config(format!("device \"{s}\": {why}"));
        let mut parts = s.trim().split(':');
        let kind = match parts.next().unwrap_or("").to_ascii_lowercase().as_str() {
            "cpu" => BackendKind::Cpu,
            "cuda" => BackendKind::Cuda,
            "wgpu" => BackendKind::Wgpu,
            other => return Err(bad(format!("unknown kind \"{other}\" (cpu, cuda or wgpu)"))),
        };
        let mut spec = DeviceSpec::new(kind, None);
        for (i, part) in parts.enumerate() {
            let Some((key, value)) = part.split_once('=') else {
                if i == 0 {
                    spec.index = Some(part.parse().map_err(|_| {
                        bad(format!("\"{part}\" is neither an index nor KEY=VALUE"))
                    })?);
                    continue;
                }
                return Err(bad(format!("\"{part}\" is not KEY=VALUE")));
            };
            let f = &mut spec.faults;
            match key.trim() {
                "threads" if kind == BackendKind::Cpu => {
                    let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        bad(format!("threads=\"{value}\" is not a positive integer"))
                    })?;
                    spec.threads = Some(n);
                }
                "threads" => return Err(bad("threads applies to cpu devices only".into())),
                "instances" => {
                    spec.instances = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_INSTANCES).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "instances=\"{value}\" is not an integer from 1 to {MAX_INSTANCES}"
                            ))
                        })?;
                }
                "delay" => f.delay = parse_duration(value).map_err(bad)?,
                "jitter" => f.jitter = parse_duration(value).map_err(bad)?,
                "hang_for" => f.hang_for = Some(parse_duration(value).map_err(bad)?),
                "fail" => f.fail = parse_probability(value).map_err(bad)?,
                "hang" => f.hang = parse_probability(value).map_err(bad)?,
                other => {
                    return Err(bad(format!(
                        "unknown option \"{other}\" (threads, instances, delay, jitter, fail, hang, hang_for)"
                    )))
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        if let Some(i) = self.index {
            write!(f, ":{i}")?;
        }
        if let Some(t) = self.threads {
            write!(f, ":threads={t}")?;
        }
        if self.instances != 1 {
            write!(f, ":instances={}", self.instances)?;
        }
        let x = &self.faults;
        if !x.delay.is_zero() {
            write!(f, ":delay={}", format_duration(x.delay))?;
        }
        if !x.jitter.is_zero() {
            write!(f, ":jitter={}", format_duration(x.jitter))?;
        }
        if x.fail > 0.0 {
            write!(f, ":fail={}", x.fail)?;
        }
        if x.hang > 0.0 {
            write!(f, ":hang={}", x.hang)?;
        }
        if let Some(h) = x.hang_for {
            write!(f, ":hang_for={}", format_duration(h))?;
        }
        Ok(())
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<DeviceSpec> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Parses `250us`, `50ms`, `2s`, `1.5s` (a bare number is milliseconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 1e9 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!("\"{s}\" is not a duration (e.g. 250us, 50ms, 2s)")),
    }
}

/// Formats a duration in the syntax [`parse_duration`] reads.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

fn parse_probability(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("\"{s}\" is not a probability in [0, 1]")),
    }
}

/// Serde helper: durations as strings in [`parse_duration`] syntax (`250us`, `50ms`, `2s`), for
/// every duration field of the engine's and the server's config.
pub(crate) mod dur {
    use std::time::Duration;

    /// Writes `d` as `50ms`.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Reads `50ms`.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Engine settings; [`Default`] holds the docs/DESIGN.md section 10.2 defaults.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Devices; empty = every usable accelerator plus the CPU.
    pub devices: Vec<DeviceSpec>,
    /// Capacity of each device worker's queue (batches). Default 100.
    pub queue_capacity: usize,
    /// Batches dispatched to one device and not yet completed (queued at the worker or
    /// running). Default 4.
    pub max_in_flight: usize,
    /// Admitted, undelivered batches in the whole engine; `None` = `queue_capacity` per device.
    pub max_pending: Option<usize>,
    /// A batch running longer than this marks its device FAILED (hung). Default 2 s.
    #[serde(with = "dur")]
    pub device_timeout: Duration,
    /// SLOW when the per-sample latency average exceeds this multiple of the best healthy
    /// device's. Default 2.0.
    pub slow_ratio: f64,
    /// ... for this many batches in a row. Default 5.
    pub slow_batches: u32,
    /// A SLOW device whose probe is under this multiple of the best is HEALTHY again. Default 1.3.
    pub recover_ratio: f64,
    /// A SLOW device gets at most one probe batch per interval. Default 1 s.
    #[serde(with = "dur")]
    pub probe_interval: Duration,
    /// Weight of the newest batch in the per-sample latency moving average. Default 0.2.
    pub ewma_alpha: f64,
    /// Times a batch is retried on another device after its device failed. Default 1.
    pub max_retries: u32,
    /// First restart delay of a FAILED worker, doubled per failure without a success in
    /// between. Default 100 ms.
    #[serde(with = "dur")]
    pub restart_backoff: Duration,
    /// Largest restart delay. Default 30 s.
    #[serde(with = "dur")]
    pub restart_backoff_max: Duration,
    /// An admitted batch that no device took within this time fails with a timeout. Default
    /// 30 s.
    #[serde(with = "dur")]
    pub queue_timeout: Duration,
    /// Anti-starvation: an IMPORTANT or BULK batch that has waited this long for a device is
    /// "aged"; at least one dispatch in four goes to the oldest aged batch (when there is one),
    /// the others follow strict priority. So sustained CRITICAL load cannot starve BULK, and an
    /// aged backlog cannot take more than a quarter of the devices from CRITICAL. Default 250 ms.
    #[serde(with = "dur")]
    pub priority_aging: Duration,
    /// How long `Engine::start` waits for the devices to open. Default 60 s.
    #[serde(with = "dur")]
    pub open_timeout: Duration,
    /// When hardware GPUs are configured, also route to the CPU (and to software adapters such
    /// as lavapipe) by expected completion time (overflow). When false, those only run batches
    /// while no hardware GPU is HEALTHY. Default false. Without a hardware GPU every device is
    /// routed to by expected completion time.
    pub cpu_overflow: bool,
    /// Allow TF32 on CUDA devices. Default false.
    pub allow_tf32: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            devices: Vec::new(),
            queue_capacity: 100,
            max_in_flight: 4,
            max_pending: None,
            device_timeout: Duration::from_secs(2),
            slow_ratio: 2.0,
            slow_batches: 5,
            recover_ratio: 1.3,
            probe_interval: Duration::from_secs(1),
            ewma_alpha: 0.2,
            max_retries: 1,
            restart_backoff: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(30),
            priority_aging: Duration::from_millis(250),
            open_timeout: Duration::from_secs(60),
            cpu_overflow: false,
            allow_tf32: false,
        }
    }
}

/// The engine settings in a file: the `[engine]` table of the TOML file `serve --config` reads
/// (the other tables are the server's and are ignored here; no `[engine]` table: defaults), or,
/// for a `.json` file, the engine settings alone as one JSON object (the documented
/// alternative, docs/DESIGN.md section 10.2).
pub fn load_engine_config(path: &std::path::Path) -> Result<EngineConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |e: String| Error::Config(format!("{}: {e}", path.display()));
    if path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("json"))
    {
        return serde_json::from_str(&text).map_err(|e| bad(e.to_string()));
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    match table.remove("engine") {
        Some(v) => v
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string())),
        None => Ok(EngineConfig::default()),
    }
}

impl EngineConfig {
    /// A default config for the given device list.
    pub fn with_devices(devices: Vec<DeviceSpec>) -> EngineConfig {
        EngineConfig {
            devices,
            ..EngineConfig::default()
        }
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::Config(format!("engine: {s}")));
        if self.queue_capacity == 0 || self.max_in_flight == 0 {
            return bad("queue_capacity and max_in_flight must be at least 1");
        }
        if self.max_pending == Some(0) {
            return bad("max_pending must be at least 1");
        }
        if self.device_timeout.is_zero() {
            return bad("device_timeout must be positive");
        }
        if !(self.slow_ratio >= 1.0 && self.recover_ratio >= 1.0) {
            return bad("slow_ratio and recover_ratio must be at least 1");
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return bad("ewma_alpha must be in (0, 1]");
        }
        if self.slow_batches == 0 {
            return bad("slow_batches must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_lists() {
        let l = DeviceSpec::parse_list(
            "cpu, cpu:threads=1:delay=50ms:jitter=5ms,cuda:0,wgpu:1:fail=0.2:hang=0.01:hang_for=3s",
        )
        .unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l[0], DeviceSpec::new(BackendKind::Cpu, None));
        assert_eq!(l[1].threads, Some(1));
        assert_eq!(l[1].faults.delay, Duration::from_millis(50));
        assert_eq!(l[1].faults.jitter, Duration::from_millis(5));
        assert_eq!(l[2].index, Some(0));
        assert_eq!(l[3].faults.fail, 0.2);
        assert_eq!(l[3].faults.hang_for, Some(Duration::from_secs(3)));
        assert_eq!(l[2].instances, 1);
        let two = DeviceSpec::parse_list("cuda:0:instances=2").unwrap();
        assert_eq!((two[0].index, two[0].instances), (Some(0), 2));
        assert_eq!(two[0].to_string(), "cuda:0:instances=2");
        for d in l.iter().chain(&two) {
            assert_eq!(&d.to_string().parse::<DeviceSpec>().unwrap(), d);
        }
        for bad in [
            "gpu",
            "cpu:x",
            "cuda:0:instances=0",
            "cuda:0:instances=9",
            "cuda:0:instances=two",
            "cpu:fail=2",
            "cpu:delay=fast",
            "cuda:threads=2",
            "cpu:1:2",
        ] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_roundtrips_through_json() {
        let mut c = EngineConfig::with_devices(DeviceSpec::parse_list("cpu:delay=5ms").unwrap());
        c.device_timeout = Duration::from_millis(200);
        let j = serde_json::to_string(&c).unwrap();
        let back: EngineConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
        let partial: EngineConfig =
            serde_json::from_str(r#"{"devices":["cpu"],"device_timeout":"500ms"}"#).unwrap();
        assert_eq!(partial.queue_capacity, 100);
        assert_eq!(partial.device_timeout, Duration::from_millis(500));
    }
}
