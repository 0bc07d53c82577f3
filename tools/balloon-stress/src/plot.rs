//! SVG charts of a run (plotters, SVG backend: no fonts or image libraries needed).

use crate::report::{Report, Sample};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;

const MIB: f64 = (1u64 << 20) as f64;

/// A named line: its label, colour, and the value it plots for each sample.
type Series = (&'static str, RGBColor, fn(&Sample) -> f64);

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e:?}")
}

/// The charts here: f64 on both axes, drawn to SVG.
type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One line series with its legend entry.
fn labelled_line(
    c: &mut Chart,
    name: &str,
    color: RGBColor,
    points: impl IntoIterator<Item = (f64, f64)>,
) -> Result<()> {
    c.draw_series(LineSeries::new(points, color))
        .map_err(chart_err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    Ok(())
}

/// Draws the legend and writes the chart's file; returns its path.
fn legend_and_save<'a, 'b: 'a>(
    c: &mut Chart<'a, 'b>,
    root: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    path: &Path,
) -> Result<String> {
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(path.display().to_string())
}

/// Writes host-vs-target.svg, reclaim-rate.svg, phase-latency.svg and flushes-per-step.svg.
pub fn write_all(dir: &Path, r: &Report) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = vec![
        host_vs_target(&dir.join("host-vs-target.svg"), &r.samples)?,
        reclaim_rate(&dir.join("reclaim-rate.svg"), &r.samples)?,
        phase_latency(&dir.join("phase-latency.svg"), r)?,
        flushes_per_step(&dir.join("flushes-per-step.svg"), r)?,
    ];
    Ok(files)
}

fn host_vs_target(path: &Path, s: &[Sample]) -> Result<String> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let t_max = s.last().map_or(1.0, |x| x.t).max(1.0);
    let y_max = s
        .iter()
        .map(|x| x.ram_bytes as f64 / MIB)
        .fold(1.0, f64::max);
    let mut c = ChartBuilder::on(&root)
        .caption("Host memory held vs balloon target", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.05)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .map_err(chart_err)?;
    let series: [Series; 3] = [
        ("host bytes held", BLUE, |x| x.host_bytes_held as f64 / MIB),
        ("guest RAM - balloon target", RED, |x| {
            (x.ram_bytes - x.target_bytes) as f64 / MIB
        }),
        ("guest RAM - balloon actual", GREEN, |x| {
            (x.ram_bytes - x.actual_bytes) as f64 / MIB
        }),
    ];
    for (name, color, f) in series {
        labelled_line(&mut c, name, color, s.iter().map(|x| (x.t, f(x))))?;
    }
    legend_and_save(&mut c, &root, path)
}

fn reclaim_rate(path: &Path, s: &[Sample]) -> Result<String> {
    let rates: Vec<(f64, f64)> = s
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let freed = w[0].host_bytes_held as f64 - w[1].host_bytes_held as f64;
            (w[1].t, freed / MIB / (w[1].t - w[0].t))
        })
        .collect();
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let t_max = s.last().map_or(1.0, |x| x.t).max(1.0);
    let hi = rates.iter().map(|r| r.1).fold(1.0, f64::max);
    let lo = rates.iter().map(|r| r.1).fold(-1.0, f64::min);
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Reclaim rate (positive: memory returned to the host)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, lo * 1.05..hi * 1.05)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB/s")
        .draw()
        .map_err(chart_err)?;
    c.draw_series(LineSeries::new(rates, BLUE))
        .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(path.display().to_string())
}

fn phase_latency(path: &Path, r: &Report) -> Result<String> {
    let g = &r.final_stats.gather;
    let phases = [
        ("batch wait", &g.wait_us),
        ("zap", &g.zap_us),
        ("invalidate", &g.invalidate_us),
        ("release", &g.release_us),
    ];
    let colors = [MAGENTA, BLUE, GREEN, RED];
    let n = phases
        .iter()
        .map(|(_, h)| h.buckets.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let y_max = phases
        .iter()
        .flat_map(|(_, h)| h.buckets.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Per-batch latency by phase (batches per power-of-two bucket)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..y_max * 1.1)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("log2(microseconds)")
        .y_desc("batches")
        .draw()
        .map_err(chart_err)?;
    for ((name, h), color) in phases.iter().zip(colors) {
        labelled_line(
            &mut c,
            name,
            color,
            h.buckets
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as f64 + 0.5, v as f64)),
        )?;
    }
    legend_and_save(&mut c, &root, path)
}

fn flushes_per_step(path: &Path, r: &Report) -> Result<String> {
    let pts: Vec<(f64, f64)> = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (i as f64 + 1.0, s.kvm_flush_requests as f64))
        .collect();
    let y_max = pts.iter().map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let mut c = ChartBuilder::on(&root)
        .caption("KVM flush requests per balloon step", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(pts.len() as f64 + 1.0), 0.0..y_max * 1.1)
        .map_err(chart_err)?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("remote_tlb_flush_requests")
        .draw()
        .map_err(chart_err)?;
    c.draw_series(
        pts.iter()
            .map(|&(x, y)| Rectangle::new([(x - 0.3, 0.0), (x + 0.3, y)], BLUE.filled())),
    )
    .map_err(chart_err)?;
    root.present().map_err(chart_err)?;
    Ok(path.display().to_string())
}
