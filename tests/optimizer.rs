//! The fused host AdamW (the CPU default) and the optimizer graph from the artifacts compute the
//! same update: same gradient norms, parameters equal to float32 rounding after several steps with
//! clipping, weight decay, accumulation and a separate head learning rate all active.

mod common;

use betadpo::dpo::{build_artifacts, BuildOptions};
use betadpo::run_layout;
use betadpo::store::read_safetensors;
use betadpo::train::config::{OptimizerKind, TrainConfig};
use betadpo::train::trainer::train;

#[test]
fn fused_adamw_matches_the_optimizer_graph() {
    let q = common::fixtures::quickstart();
    let dir = common::fixtures::scratch("optimizer-kinds");
    let art = dir.join("art");
    build_artifacts(&q.join("model.onnx"), &art, &BuildOptions::default()).unwrap();
    let run = |kind: OptimizerKind, name: &str, flush_denormals: bool| {
        let cfg = TrainConfig {
            artifacts: art.clone(),
            data: q.join("train.jsonl"),
            tokenizer: q.join("tokenizer.json"),
            out: dir.join(name),
            max_steps: Some(8),
            batch_size: 4,
            grad_accum: 2,
            weight_decay: 0.1,
            max_grad_norm: 0.5,
            warmup_steps: 2,
            lr: 1e-3,
            lr_schedule: "cosine".parse().unwrap(),
            threads: Some(1),
            progress: false,
            optimizer: kind,
            flush_denormals,
            ..Default::default()
        };
        train(&cfg).unwrap();
        let (params, _) = read_safetensors(&dir.join(name).join("final/params.safetensors")).unwrap();
        let norms: Vec<f64> = std::fs::read_to_string(dir.join(name).join(run_layout::METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"].as_f64().unwrap())
            .collect();
        (params, norms)
    };
    let (graph_params, graph_norms) = run(OptimizerKind::Graph, "graph", false);
    let (fused_params, fused_norms) = run(OptimizerKind::Fused, "fused", false);
    // Subnormals as zero (graphs and kernel) changes nothing at this scale.
    let (flushed_params, flushed_norms) = run(OptimizerKind::Fused, "fused-ftz", true);
    assert_eq!(graph_norms.len(), 8);
    for ((a, b), c) in graph_norms.iter().zip(&fused_norms).zip(&flushed_norms) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "grad_norm {a} (graph) vs {b} (fused)");
        assert!((a - c).abs() <= 1e-4 * a.abs(), "grad_norm {a} (graph) vs {c} (fused, subnormals flushed)");
    }
    // clipping was active at least once, so the clipped path is compared too
    assert!(graph_norms.iter().any(|&n| n > 0.5), "{graph_norms:?}");
    let mut moved = 0;
    for ((a, b), c) in graph_params.iter().zip(&fused_params).zip(&flushed_params) {
        assert_eq!(a.name, b.name);
        let scale = a.data.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-3);
        for (other, what) in [(b, "fused"), (c, "fused with subnormals flushed")] {
            let diff = a.data.iter().zip(&other.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-4 * scale, "{}: graph and {what} differ by {diff} (scale {scale})", a.name);
        }
        moved += 1;
    }
    assert!(moved > 10);
}
