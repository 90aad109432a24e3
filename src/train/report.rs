//! What a person reads after a run: `RUN/report.svg` (loss, reward accuracy, margins, and beta
//! per group over steps) and a one-screen summary of the evaluation before and after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::{Map, Value};

use super::metrics::read_log;
use super::summary::TrainSummary;
use crate::run_layout::{METRICS_FILE, REPORT_FILE};
use crate::{Error, Result};

type Series = Vec<(f64, f64)>;

fn series(log: &[Map<String, Value>], key: &str) -> Series {
    log.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).filter(|(_, y)| y.is_finite()).collect()
}

const COLORS: [RGBColor; 6] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(255, 127, 14), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, title: &str, lines: &[(String, Series)]) -> Result<()> {
    let err = |e: String| Error::Report(format!("drawing the report: {e}"));
    let pts: Vec<&(f64, f64)> = lines.iter().flat_map(|(_, s)| s.iter()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    if (y1 - y0).abs() < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = 0.05 * (y1 - y0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(e.to_string()))?;
    chart.configure_mesh().x_desc("step").light_line_style(WHITE.mix(0.0)).draw().map_err(|e| err(e.to_string()))?;
    for (i, (name, s)) in lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        // Per-step training values are noisy: draw them faintly, with a moving average on top.
        let shown = if s.len() > 40 {
            chart.draw_series(LineSeries::new(s.iter().copied(), c.mix(0.2).stroke_width(1))).map_err(|e| err(e.to_string()))?;
            moving_average(s, (s.len() / 40).max(3))
        } else {
            s.clone()
        };
        chart
            .draw_series(LineSeries::new(shown, c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Centered moving average over `window` points (shorter at the ends).
fn moving_average(s: &Series, window: usize) -> Series {
    let half = window / 2;
    (0..s.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(s.len());
            let m = s[lo..hi].iter().map(|p| p.1).sum::<f64>() / (hi - lo) as f64;
            (s[i].0, m)
        })
        .collect()
}

/// Draws `RUN/report.svg` from `RUN/metrics.jsonl`.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    let log = read_log(&run.join(METRICS_FILE))?;
    let train: Vec<Map<String, Value>> = log.iter().filter(|r| r.contains_key("loss")).cloned().collect();
    let eval: Vec<Map<String, Value>> = log.iter().filter(|r| r.contains_key("eval/loss")).cloned().collect();
    let groups: Vec<String> = eval.last().map(|r| r.keys().filter_map(|k| k.strip_prefix("eval/beta/mean/")).map(str::to_string).collect()).unwrap_or_default();
    let path = run.join(REPORT_FILE);
    let tmp = run.join(format!(".{REPORT_FILE}.partial"));
    {
        let root = SVGBackend::new(&tmp, (1200, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| Error::Report(e.to_string()))?;
        let areas = root.split_evenly((2, 2));
        panel(&areas[0], "loss", &[("train".into(), series(&train, "loss")), ("eval".into(), series(&eval, "eval/loss"))])?;
        let mut acc = vec![("train".into(), series(&train, "rewards/accuracies")), ("eval".into(), series(&eval, "eval/rewards/accuracies"))];
        for g in &groups {
            acc.push((format!("eval {g}"), series(&eval, &format!("eval/rewards/accuracies/{g}"))));
        }
        panel(&areas[1], "reward accuracy", &acc)?;
        panel(&areas[2], "reward margin", &[("train".into(), series(&train, "rewards/margins")), ("eval".into(), series(&eval, "eval/rewards/margins"))])?;
        let mut beta = vec![("train mean".to_string(), series(&train, "beta/mean"))];
        // epsilon-DPO's global beta, which the pairs' betas scatter around
        let global = series(&train, "kl/beta");
        if !global.is_empty() {
            beta.push(("epsilon-DPO global (kl/beta)".to_string(), global));
        }
        for g in &groups {
            beta.push((format!("eval {g}"), series(&eval, &format!("eval/beta/mean/{g}"))));
        }
        panel(&areas[3], "learned beta", &beta)?;
        root.present().map_err(|e| Error::Report(format!("writing {}: {e}", tmp.display())))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn f(r: Option<&Map<String, Value>>, key: &str) -> String {
    match r.and_then(|r| r.get(key)).and_then(Value::as_f64) {
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    }
}

/// Groups present in an eval record.
pub fn eval_groups(r: &Map<String, Value>) -> Vec<String> {
    let mut g: Vec<String> = r.keys().filter_map(|k| k.strip_prefix("eval/beta/mean/")).map(str::to_string).collect();
    g.sort();
    g
}

/// The one-screen summary printed at the end of `train`.
pub fn summary_table(s: &TrainSummary) -> String {
    let mut out = format!("trained {} steps into {}", s.steps, s.run.display());
    if let Some(r) = s.resumed_from {
        out.push_str(&format!(" (resumed from step {r})"));
    }
    out.push('\n');
    if let Some(t) = &s.last_train {
        out.push_str(&format!(
            "last step: loss {}, reward accuracy {}, beta mean {}; {} s (train graph {} s, optimizer {} s)\n",
            f(Some(t), "loss"),
            f(Some(t), "rewards/accuracies"),
            f(Some(t), "beta/mean"),
            f(Some(t), "step_time_s"),
            f(Some(t), "train_graph_time_s"),
            f(Some(t), "optimizer_time_s")
        ));
    }
    if let Some(t) = s.last_train.as_ref().filter(|t| t.contains_key("kl/beta")) {
        out.push_str(&format!(
            "epsilon-DPO: global beta {} at the last step; pairs stepping up {}, down {} (kl/p_epsilon_steps, kl/n_epsilon_steps)\n",
            f(Some(t), "kl/beta"),
            f(Some(t), "kl/p_epsilon_steps"),
            f(Some(t), "kl/n_epsilon_steps")
        ));
    }
    let Some(after) = &s.final_eval else { return out };
    let before = s.initial_eval.as_ref();
    out.push_str(&format!("{:<12} {:>10} {:>10} {:>10} {:>12}\n", "eval group", "acc before", "acc after", "beta", "drift |Δlogp|"));
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for g in eval_groups(after) {
        rows.insert(g.clone(), format!("/{g}"));
    }
    rows.insert("(all)".into(), String::new());
    for (name, suffix) in rows {
        out.push_str(&format!(
            "{:<12} {:>10} {:>10} {:>10} {:>12}\n",
            name,
            f(before, &format!("eval/rewards/accuracies{suffix}")),
            f(Some(after), &format!("eval/rewards/accuracies{suffix}")),
            f(Some(after), &format!("eval/beta/mean{suffix}")),
            f(Some(after), &format!("eval/drift/abs_logratio{suffix}")),
        ));
    }
    out
}
