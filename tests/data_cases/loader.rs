//! Collation-independent ordering: deterministic shuffling, exact resume, length bucketing.

use super::*;

fn tokens_of(n: usize, len: usize) -> TokenizedPair {
    TokenizedPair {
        prompt: vec![1; 1 + len % 3],
        chosen: vec![2; len],
        rejected: vec![3; 1 + len / 2],
        prompt_cut: [0, 0],
        extras: Default::default(),
        source_index: n,
    }
}

fn loader(n: usize, cfg: LoaderConfig) -> DataLoader {
    let pairs = (0..n).map(|i| tokens_of(i, 1 + (i * 7) % 23)).collect();
    DataLoader::new(pairs, cfg, CollateOptions::default()).unwrap()
}

#[test]
fn shuffling_is_deterministic_and_resumable() {
    let cfg = LoaderConfig { batch_size: 3, seed: 7, shuffle: true, bucket_batches: 0, drop_last: false };
    let a = loader(10, cfg.clone());
    let e0 = a.epoch_batches(0);
    assert_eq!(e0, loader(10, cfg.clone()).epoch_batches(0), "same seed, same order");
    assert_ne!(e0, a.epoch_batches(1), "each epoch is reshuffled");
    assert_ne!(e0, loader(10, LoaderConfig { seed: 8, ..cfg.clone() }).epoch_batches(0));
    let mut all: Vec<usize> = e0.concat();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    assert_eq!(e0.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
    assert_eq!(loader(10, LoaderConfig { drop_last: true, ..cfg.clone() }).batches_per_epoch(), 3);
    // Resume: a fresh loader seeked to a saved position yields the same batches.
    let mut run = loader(10, cfg.clone());
    for _ in 0..6 {
        run.next_batch().unwrap();
    }
    let pos = run.position();
    assert_eq!(pos, LoaderPosition { epoch: 1, index: 2 });
    let saved = serde_json::to_string(&pos).unwrap();
    let mut resumed = loader(10, cfg);
    resumed.seek(serde_json::from_str(&saved).unwrap());
    for _ in 0..5 {
        assert_eq!(run.next_batch().unwrap(), resumed.next_batch().unwrap());
    }
}

#[test]
fn bucketing_cuts_padding() {
    let padding = |bucket_batches| {
        let cfg = LoaderConfig { batch_size: 4, seed: 1, shuffle: true, bucket_batches, drop_last: false };
        let mut l = loader(200, cfg);
        let batches = l.batches_per_epoch();
        (0..batches).map(|_| l.next_batch().unwrap()).map(|b| b.input_ids.len() - b.num_tokens).sum::<usize>()
    };
    let (plain, bucketed) = (padding(0), padding(50));
    assert!(bucketed * 2 < plain, "bucketed padding {bucketed} vs {plain}");
}
