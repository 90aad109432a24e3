//! Seeded mutation fuzzing for the file readers: a byte mutator (truncation, bit flips, spliced
//! garbage, huge lengths and numbers, duplicated and deleted chunks) and a harness that runs each
//! mutated input in its own thread with a time bound. A panic, a hang or an error that is not one
//! line fails the test and names the case; `BETADPO_FUZZ_CASES=N` scales the case counts for a
//! longer run. Mutations may be benign: an accepted input is fine too.

#![allow(dead_code)]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Values that break length and offset fields: protobuf varints and little-endian integers of
/// the largest sizes, and decimal numbers that overflow or are negative.
const HUGE: &[&[u8]] = &[
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80],
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"-1",
    b"1e309",
    b"4294967296",
];

/// Bytes that change the structure of text formats.
const TOKENS: &[&[u8]] = &[b"{", b"}", b"[", b"]", b"\"", b",", b":", b"\\u", b"\\ud800", b"null", b"\n", b"{%", b"{{", b"%}", b"\xff\xfe"];

pub struct Mutator {
    rng: ChaCha8Rng,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// One to three mutations of `input`.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..self.rng.random_range(1..=3) {
            self.mutate_once(&mut v);
        }
        v
    }

    fn pos(&mut self, v: &[u8]) -> usize {
        self.rng.random_range(0..=v.len())
    }

    fn mutate_once(&mut self, v: &mut Vec<u8>) {
        match self.rng.random_range(0..8) {
            0 => {
                let at = self.pos(v);
                v.truncate(at);
            }
            1 if !v.is_empty() => {
                for _ in 0..self.rng.random_range(1..=8) {
                    let at = self.rng.random_range(0..v.len());
                    v[at] ^= 1 << self.rng.random_range(0..8);
                }
            }
            2 => {
                let at = self.pos(v);
                let garbage: Vec<u8> = (0..self.rng.random_range(1..=64)).map(|_| self.rng.random()).collect();
                v.splice(at..at, garbage);
            }
            3 => self.overwrite(v, HUGE),
            4 => {
                let at = self.pos(v);
                let t = TOKENS[self.rng.random_range(0..TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            5 => {
                // a whole number replaced by a huge one: reaches fields a bit flip rarely makes absurd
                let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit())).collect();
                if digits.is_empty() {
                    return self.overwrite(v, HUGE);
                }
                let start = digits[self.rng.random_range(0..digits.len())];
                let end = (start..v.len()).find(|&i| !v[i].is_ascii_digit()).unwrap_or(v.len());
                let h = HUGE[self.rng.random_range(5..HUGE.len())];
                v.splice(start..end, h.iter().copied());
            }
            6 if !v.is_empty() => {
                let (a, len) = self.chunk(v);
                let chunk = v[a..a + len].to_vec();
                let at = self.pos(v);
                v.splice(at..at, chunk);
            }
            _ if !v.is_empty() => {
                let (a, len) = self.chunk(v);
                v.drain(a..a + len);
            }
            _ => v.extend_from_slice(HUGE[0]),
        }
    }

    /// Mutations that keep JSON (or each line of JSONL) valid, so that they reach the checks
    /// after parsing: a value replaced by a hostile one (wrong type, huge or negative number,
    /// path, deep nesting), or an entry removed. Input that is not JSON gets byte mutations.
    pub fn mutate_json(&mut self, input: &[u8]) -> Vec<u8> {
        if let Ok(mut v) = serde_json::from_slice::<Value>(input) {
            for _ in 0..self.rng.random_range(1..=3) {
                self.mutate_value(&mut v);
            }
            return serde_json::to_vec_pretty(&v).unwrap();
        }
        let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        let k = self.rng.random_range(0..lines.len());
        let mutated = match serde_json::from_slice::<Value>(lines[k]) {
            Ok(mut v) => {
                self.mutate_value(&mut v);
                serde_json::to_vec(&v).unwrap()
            }
            Err(_) => return self.mutate(input),
        };
        lines[k] = &mutated;
        lines.join(&b'\n')
    }

    fn mutate_value(&mut self, root: &mut Value) {
        let count = count_values(root);
        let target = nth_value(root, self.rng.random_range(0..count)).expect("in range");
        let remove = self.rng.random_bool(0.2);
        match target {
            Value::Object(m) if remove && !m.is_empty() => {
                let key = m.keys().nth(self.rng.random_range(0..m.len())).unwrap().clone();
                m.remove(&key);
            }
            Value::Array(a) if remove && !a.is_empty() => {
                a.remove(self.rng.random_range(0..a.len()));
            }
            t => *t = self.hostile_value(),
        }
    }

    fn hostile_value(&mut self) -> Value {
        match self.rng.random_range(0..14) {
            0 => Value::Null,
            1 => json!(true),
            2 => json!(-1),
            3 => json!(0),
            4 => json!(u64::MAX),
            5 => json!(i64::MIN),
            6 => json!(1e308),
            7 => json!(""),
            8 => json!("/etc/passwd"),
            9 => json!("../../x"),
            10 => json!([]),
            11 => json!({}),
            12 => (0..200).fold(json!(0), |v, _| json!([v])),
            _ => json!("\u{0}\u{ffff}{{ x }}{% for %}"),
        }
    }

    fn chunk(&mut self, v: &[u8]) -> (usize, usize) {
        let a = self.rng.random_range(0..v.len());
        let len = self.rng.random_range(1..=(v.len() - a).min(256));
        (a, len)
    }

    fn overwrite(&mut self, v: &mut Vec<u8>, values: &[&[u8]]) {
        let h = values[self.rng.random_range(0..values.len())];
        let at = self.pos(v);
        let end = (at + h.len()).min(v.len());
        v.splice(at..end, h.iter().copied());
    }
}

fn count_values(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_values).sum(),
        Value::Object(m) => m.values().map(count_values).sum(),
        _ => 0,
    }
}

/// The `k`-th value of `v` in pre-order.
fn nth_value(v: &mut Value, k: usize) -> Option<&mut Value> {
    if k == 0 {
        return Some(v);
    }
    let mut k = k - 1;
    let children: Vec<&mut Value> = match v {
        Value::Array(a) => a.iter_mut().collect(),
        Value::Object(m) => m.values_mut().collect(),
        _ => return None,
    };
    for c in children {
        let n = count_values(c);
        if k < n {
            return nth_value(c, k);
        }
        k -= n;
    }
    None
}

/// `default`, or `BETADPO_FUZZ_CASES` when set (for longer runs by hand).
pub fn case_count(default: usize) -> usize {
    std::env::var("BETADPO_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What a fuzz run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub accepted: usize,
    pub refused: usize,
    /// One refusal per distinct first words, to show what the errors look like.
    pub samples: Vec<String>,
}

/// Runs `case` on `cases` inputs made by `make` (case index → input), each in a thread bounded
/// by `bound`. Fails on a panic, a hang, or an error that is empty or spans lines.
pub fn run<I, M, C>(name: &str, cases: usize, bound: Duration, mut make: M, case: C) -> Outcome
where
    I: Send + 'static,
    M: FnMut(usize) -> I,
    C: Fn(usize, I) -> Result<(), String> + Send + Sync + 'static,
{
    let case = Arc::new(case);
    let mut outcome = Outcome::default();
    let start = Instant::now();
    for i in 0..cases {
        let input = make(i);
        let (tx, rx) = mpsc::channel();
        let c = Arc::clone(&case);
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c(i, input)));
                let _ = tx.send(r);
            })
            .unwrap();
        match rx.recv_timeout(bound) {
            Err(_) => panic!("{name}: case {i} ran longer than {bound:?} (a hang?); replay it with the same seed and case index"),
            Ok(Err(_)) => panic!("{name}: case {i} panicked (message above); replay it with the same seed and case index"),
            Ok(Ok(Ok(()))) => outcome.accepted += 1,
            Ok(Ok(Err(e))) => {
                assert!(!e.trim().is_empty() && !e.contains('\n'), "{name}: case {i}: the error is not one line: {e:?}");
                outcome.refused += 1;
                let head: String = e.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
                if outcome.samples.len() < 6 && !outcome.samples.iter().any(|s| s.starts_with(&head)) {
                    outcome.samples.push(e.chars().take(200).collect());
                }
            }
        }
    }
    eprintln!(
        "{name}: {cases} cases in {:.2}s: {} accepted, {} refused, e.g. {:#?}",
        start.elapsed().as_secs_f64(),
        outcome.accepted,
        outcome.refused,
        outcome.samples
    );
    outcome
}

/// Every file under `dir` with its length and modification time, to show a run wrote nothing.
pub fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()) {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            v.push((e.path(), meta.len(), meta.modified().ok()));
        }
    }
    v.sort();
    v
}
