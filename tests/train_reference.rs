//! `betadpo train`'s reference log-prob cache: written once, reused, rebuilt when stale, and holding the
//! reference model's log-probs of exactly the rows trained on (ONNX Runtime computes them independently).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use betadpo::dpo::{Manifest, ObjectiveConfig};
use betadpo::runtime::{ExecutionProvider, SessionConfig};
use betadpo::store::{read_safetensors, write_safetensors, NamedTensor};
use betadpo::text::{load_preferences, LoadOptions, PairTokenizer, TokenizedPair, TruncationConfig};
use betadpo::train::config::TrainConfig;
use betadpo::train::device::Device;
use betadpo::train::session_io::{forward_values, Feeds};
use betadpo::train::{collate, CollateOptions, DataLoader, LoaderConfig};

use common::fixtures::scratch;
use common::train_run::*;

// ---------------------------------------------------------------------------------------------
// Reference log-prob cache

/// The reference table cached for data set `kind` ("train" or "eval") in `run`, by source index.
fn reference_table(run: &Path, kind: &str) -> BTreeMap<usize, (f32, f32)> {
    let file =
        reference_files(run).into_iter().find(|f| f.0.starts_with(&format!("{kind}-"))).unwrap_or_else(|| panic!("no {kind} cache in {}", run.display()));
    let (t, _) = read_safetensors(&run.join("reference").join(&file.0)).unwrap();
    let get = |name: &str| t.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{}: no {name}", file.0));
    let (idx, vals) = (get("source_index"), get("ref_logps"));
    assert_eq!(vals.shape, vec![idx.data.len(), 2], "{}: one (chosen, rejected) pair per row", file.0);
    idx.data.iter().enumerate().map(|(i, &s)| (s as usize, (vals.data[2 * i], vals.data[2 * i + 1]))).collect()
}

#[test]
fn reference_cache() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("refcache");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let d1 = head(&inp.train, 24, &dir, "d1.jsonl");
    let d2 = head(&inp.train, 20, &dir, "d2.jsonl");
    let eval = head(&inp.test, 8, &dir, "eval.jsonl");
    let cfg = |data: &Path, out: &Path, steps: u64| TrainConfig { eval_data: Some(eval.clone()), ..config(&art, data, &inp, out, steps) };

    let run = dir.join("run");
    run_train(&cfg(&d1, &run, 2));
    let first = reference_files(&run);
    let names: Vec<&str> = first.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("eval-") && names[1].starts_with("train-"), "{names:?}");
    let train_rows = reference_table(&run, "train");
    assert_eq!(train_rows.len(), 8, "2 steps of 4 pairs use 8 of the 24 training pairs");
    assert_eq!(reference_table(&run, "eval").len(), 8, "every eval pair");
    assert!(train_rows.values().all(|&(c, r)| c.is_finite() && c < 0.0 && r.is_finite() && r < 0.0), "log-probs are negative and finite");

    // Resuming reuses the cache: the eval file is not rewritten, the training rows kept are kept as they were.
    std::thread::sleep(Duration::from_millis(20));
    let s = run_train(&TrainConfig { resume: true, ..cfg(&d1, &run, 4) });
    assert_eq!((s.steps, s.resumed_from), (4, Some(2)));
    assert_eq!(reference_files(&run)[0], first[0], "the eval cache was rewritten on resume");
    let grown = reference_table(&run, "train");
    assert_eq!(grown.len(), 16, "4 steps use 16 pairs");
    assert!(train_rows.iter().all(|(s, v)| grown.get(s) == Some(v)), "cached rows changed on resume");

    // The same data in another run directory gives the same key and the same values.
    let again = dir.join("again");
    run_train(&cfg(&d1, &again, 1));
    let a = reference_files(&again);
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), first.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert_eq!(a[0].2, first[0].2, "the same eval data gives the same eval file");
    let one_step = reference_table(&again, "train");
    assert_eq!(one_step.len(), 4);
    assert!(one_step.iter().all(|(s, v)| train_rows.get(s) == Some(v)), "one step's rows are the first step's, with the same values");

    // Other data: another train cache file (the eval one is shared).
    let other = dir.join("other");
    run_train(&cfg(&d2, &other, 1));
    let o = reference_files(&other);
    assert_eq!(o[0].0, first[0].0, "same eval data, same eval cache key");
    assert_ne!(o[1].0, first[1].0, "other training data must not reuse the cache key");
    // Other tokenization of the same data is other data too.
    let shorter = dir.join("shorter");
    run_train(&TrainConfig { max_length: Some(24), ..cfg(&d1, &shorter, 1) });
    assert_ne!(reference_files(&shorter)[1].0, first[1].0, "truncation must change the cache key");
    // Other initial weights (other artifacts) change it too.
    std::fs::create_dir_all(dir.join("fixed")).unwrap();
    let art2 = artifacts(&inp.model, &dir.join("fixed"), ObjectiveConfig { fixed_beta: Some(0.2), ..Default::default() });
    let fixed = dir.join("fixed-run");
    run_train(&TrainConfig { artifacts: art2, ..cfg(&d1, &fixed, 1) });
    assert_ne!(reference_files(&fixed)[1].0, first[1].0, "other artifacts must change the cache key");
    // So do frozen weights that a large eval graph keeps in `<file>.data` beside it.
    let eval_graph = art.join(&Manifest::load(&art).unwrap().graph("eval").unwrap().file);
    std::fs::write(format!("{}.data", eval_graph.display()), b"other frozen weights").unwrap();
    let frozen = dir.join("frozen-run");
    run_train(&cfg(&d1, &frozen, 1));
    assert_ne!(reference_files(&frozen)[1].0, first[1].0, "the eval graph's external data must change the cache key");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reference log-probs of `pairs` as ONNX Runtime computes them with the artifacts' eval graph
/// and initial parameters, all in one padded batch (as a run that computed the whole table did).
fn reference_by_ort(art: &Path, pairs: &[&TokenizedPair], pad_id: u32) -> Vec<(f32, f32)> {
    let m = Manifest::load(art).unwrap();
    let spec = m.graph("eval").unwrap();
    let mut session = SessionConfig { intra_threads: Some(1), ..Default::default() }.session_from_file(&art.join(&spec.file)).unwrap();
    let device = Device::for_ep(&ExecutionProvider::Cpu);
    let mut initial: HashMap<String, NamedTensor> = params(&art.join(&m.parameters_file)).into_iter().map(|t| (t.name.clone(), t)).collect();
    let names: Vec<String> = m.trainable().map(|p| p.name.clone()).collect();
    let values = names.iter().map(|n| initial.remove(n).map(|t| device.upload(&t.shape, t.data).unwrap()).unwrap()).collect();
    let batch = collate(pairs, &CollateOptions { pad_id, ..Default::default() }).unwrap();
    let out = forward_values(&mut session, spec, &batch, &vec![0.0; 2 * pairs.len()], &Feeds { names, values }, &device).unwrap();
    (0..pairs.len()).map(|i| (out.policy_logps[i], out.policy_logps[pairs.len() + i])).collect()
}

/// A `--max-steps 2` run on the whole training set computes reference log-probs for the 8 pairs
/// its two batches draw and no others; they are ONNX Runtime's; extending the run computes only
/// the pairs the new steps draw, and reuses the cached ones as they are (a planted value survives).
#[test]
fn reference_rows_are_the_rows_used() {
    let Some(inp) = inputs() else { return };
    let dir = scratch("refrows");
    let art = artifacts(&inp.model, &dir, ObjectiveConfig::default());
    let eval = head(&inp.test, 8, &dir, "eval.jsonl");
    let cfg = |out: &Path, steps: u64| TrainConfig { eval_data: Some(eval.clone()), ..config(&art, &inp.train, &inp, out, steps) };

    // The pairs the steps draw, from the loader as a run sets it up.
    let base = cfg(&dir.join("unused"), 2);
    let tok = PairTokenizer::from_files(&inp.tokenizer, None).unwrap();
    let rows = load_preferences(&inp.train, &LoadOptions::default()).unwrap().rows;
    let (pairs, _) = tok.tokenize_all(&rows, &TruncationConfig { max_length: base.max_length, mode: base.truncation_mode }).unwrap();
    let loader_cfg = LoaderConfig { batch_size: 4, seed: base.seed, shuffle: true, bucket_batches: base.bucket_batches, drop_last: false };
    let loader = DataLoader::new(pairs.clone(), loader_cfg, CollateOptions::default()).unwrap();
    let batches = loader.epoch_batches(0);
    let drawn = |steps: usize| -> BTreeSet<usize> { batches[..steps].iter().flatten().map(|&i| pairs[i].source_index).collect() };
    assert!(pairs.len() >= 100, "{}: the test wants a data set much larger than the rows used", inp.train.display());

    let run = dir.join("run");
    let s = run_train(&cfg(&run, 2));
    assert_eq!(s.reference_pairs_computed, 8 + 8, "2 steps of 4 training pairs, and the 8 eval pairs");
    // Eval pairs are computed in the evaluator's batches: at step 0 the policy is the reference, bit for bit.
    let step0 = s.initial_eval.as_ref().unwrap();
    assert_eq!((f(step0, "eval/rewards/margins"), f(step0, "eval/rewards/accuracies")), (0.0, 0.0), "step-0 rewards are exactly zero");
    let table = reference_table(&run, "train");
    assert_eq!(table.keys().copied().collect::<BTreeSet<_>>(), drawn(2), "the cache holds exactly the pairs the 2 steps drew, of {}", pairs.len());
    let used: Vec<&TokenizedPair> = table.keys().map(|&s| pairs.iter().find(|p| p.source_index == s).unwrap()).collect();
    for ((s, &(c, r)), (tc, tr)) in table.iter().zip(reference_by_ort(&art, &used, tok.pad_id())) {
        for (what, got, want) in [("chosen", c, tc), ("rejected", r, tr)] {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "pair {s} {what}: cached {got}, ONNX Runtime {want}");
        }
    }

    // Extending to 4 steps computes the 8 pairs steps 3 and 4 draw; cached rows are read, not recomputed.
    let file = run.join("reference").join(&reference_files(&run).into_iter().find(|f| f.0.starts_with("train-")).unwrap().0);
    let (mut tensors, _) = read_safetensors(&file).unwrap();
    // The file's first row (rows are by source index): a pair of steps 1-2, which steps 3 and 4 do not draw again.
    let planted = *table.keys().next().unwrap();
    tensors.iter_mut().find(|t| t.name == "ref_logps").unwrap().data[0] = -1234.5;
    write_safetensors(&file, &tensors, None).unwrap();
    let s = run_train(&TrainConfig { resume: true, ..cfg(&run, 4) });
    assert_eq!((s.steps, s.resumed_from, s.reference_pairs_computed), (4, Some(2), 8), "only the new steps' pairs are computed");
    let extended = reference_table(&run, "train");
    assert_eq!(extended.keys().copied().collect::<BTreeSet<_>>(), drawn(4));
    assert_eq!(extended[&planted].0, -1234.5, "a cached value was recomputed");

    // One run of 4 steps fills the same table, bit for bit (the planted row aside).
    let straight = dir.join("straight");
    assert_eq!(run_train(&cfg(&straight, 4)).reference_pairs_computed, 16 + 8);
    let once = reference_table(&straight, "train");
    let differing: Vec<usize> = once.iter().filter(|(s, v)| extended.get(s) != Some(v)).map(|(s, _)| *s).collect();
    assert_eq!(differing, vec![planted], "tables filled in one run and in two differ");
    let _ = std::fs::remove_dir_all(&dir);
}
