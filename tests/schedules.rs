//! The learning-rate schedules against the multipliers transformers' `get_scheduler` computed
//! (tests/fixtures/schedules/transformers_schedules.json, from scripts/fixtures/make_schedule_fixture.py).

use betadpo::train::schedule::{factor, warmup_steps, Schedule};
use serde_json::Value;

#[test]
fn schedules_match_transformers_step_for_step() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedules/transformers_schedules.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() > 200, "the fixture covers the grid");
    let mut checked = 0;
    for c in cases {
        let kind: Schedule = c["type"].as_str().unwrap().parse().unwrap();
        let total = c["total"].as_u64().unwrap();
        let ratio = c["warmup_ratio"].as_f64().unwrap();
        let warmup = warmup_steps(c["warmup_steps"].as_u64().unwrap(), ratio, total);
        if let Some(resolved) = c.get("resolved_warmup") {
            assert_eq!(warmup, resolved.as_u64().unwrap(), "warm-up of ratio {ratio} over {total} steps");
        }
        let want: Vec<f64> = c["multipliers"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(want.len() as u64, total);
        for (i, w) in want.iter().enumerate() {
            let got = factor(kind, i as u64 + 1, warmup, total);
            assert!((got - w).abs() <= 1e-12, "{kind} step {} of {total}, warm-up {warmup}: {got} against transformers' {w}", i + 1);
            checked += 1;
        }
    }
    assert!(checked > 3000, "{checked} steps checked");
}
