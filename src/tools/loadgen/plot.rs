//! The SVG of a run: p99 latency per class over time, throughput, and queue depth per class.

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;
use super::stats::{percentile_ms, CLASSES};
use super::LoadgenError;

/// Width of a time bucket, ms.
const BUCKET_MS: u32 = 250;

const COLORS: [RGBColor; 3] = [RED, BLUE, RGBColor(0, 150, 0)];

type Series = Vec<(f64, f64)>;

/// One panel: title, y unit, named series.
type Panel<'a> = (&'a str, &'a str, Vec<(&'a str, &'a Series)>);

/// Per class: (bucket start s, p99 ms); and (bucket start s, results/s per fast subscriber).
fn latency_and_rate(r: &Report) -> ([Series; 3], Series) {
    let t = &r.timeline;
    let end = t.latency.iter().flatten().map(|x| x.0).max().unwrap_or(0);
    let buckets = (end / BUCKET_MS + 1) as usize;
    let mut rate = vec![0u64; buckets];
    let mut p99: [Series; 3] = Default::default();
    for (series, lats) in p99.iter_mut().zip(&t.latency) {
        let mut per: Vec<Vec<u32>> = vec![Vec::new(); buckets];
        for &(at, lat) in lats {
            let b = (at / BUCKET_MS) as usize;
            if let (Some(v), Some(n)) = (per.get_mut(b), rate.get_mut(b)) {
                v.push(lat);
                *n += 1;
            }
        }
        for (b, mut v) in per.into_iter().enumerate() {
            v.sort_unstable();
            if let Some(p) = percentile_ms(&v, 0.99) {
                series.push((b as f64 * f64::from(BUCKET_MS) / 1000.0, p));
            }
        }
    }
    let per_s = 1000.0 / f64::from(BUCKET_MS) / t.fast.max(1) as f64;
    let rate = rate
        .iter()
        .enumerate()
        .map(|(b, n)| (b as f64 * f64::from(BUCKET_MS) / 1000.0, *n as f64 * per_s))
        .collect();
    (p99, rate)
}

fn max_of<'a>(s: impl Iterator<Item = &'a (f64, f64)>, floor: f64) -> (f64, f64) {
    s.fold((1.0, floor), |(x, y), p| (x.max(p.0), y.max(p.1)))
}

/// Writes the plot.
pub(crate) fn write(r: &Report, path: &Path) -> Result<(), LoadgenError> {
    let perr = |e: &dyn std::fmt::Display| LoadgenError::Plot(format!("{}: {e}", path.display()));
    let (p99, rate) = latency_and_rate(r);
    let queue: [Series; 3] = [1, 2, 3].map(|c| {
        r.timeline
            .scrapes
            .iter()
            .map(|s| (s.t_ms as f64 / 1000.0, s.queue[c]))
            .collect()
    });
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let areas = root.split_evenly((3, 1));
    let panels: [Panel<'_>; 3] = [
        (
            "p99 latency per class (fast subscribers)",
            "ms",
            (0..3).map(|c| (CLASSES[c], &p99[c])).collect(),
        ),
        (
            "throughput per fast subscriber",
            "results/s",
            vec![("results", &rate)],
        ),
        (
            "queued messages per class (all connections)",
            "messages",
            (0..3).map(|c| (CLASSES[c], &queue[c])).collect(),
        ),
    ];
    for (area, (title, unit, series)) in areas.iter().zip(panels) {
        let (xmax, ymax) = max_of(series.iter().flat_map(|s| s.1.iter()), 1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{}: {title}", r.scenario), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax * 1.05)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("s")
            .y_desc(unit)
            .draw()
            .map_err(|e| perr(&e))?;
        for (k, (name, s)) in series.into_iter().enumerate() {
            let color = if name == "results" {
                BLACK
            } else {
                COLORS[k % 3]
            };
            chart
                .draw_series(LineSeries::new(s.iter().copied(), color))
                .map_err(|e| perr(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| perr(&e))?;
    }
    root.present().map_err(|e| perr(&e))?;
    Ok(())
}
