//! The library's layers only point down, and no two files import each other (through any chain).
//!
//! Reads every `crate::` and `super::` path in `src/` (test modules excluded), resolves it to the file
//! that defines it (following `pub use` re-exports of module files), and checks
//! 1. each import against the layer order `betadpo::LAYERS` declares (a module may use its own layer
//!    and those below it), and
//! 2. that the files' import graph has no cycle (a module file's own submodules are its parts, not its
//!    dependencies, so `mod.rs` → child edges are not counted).
//!
//! A test, not a workspace of crates: the layers are one crate's modules, and splitting them into
//! crates would make every `pub(crate)` item public. See docs/design.md.

#[path = "common/source_files.rs"]
mod source_files;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// A source file: its module path (`["dpo", "artifacts", "load"]`) and text.
struct SourceFile {
    module: Vec<String>,
    text: String,
}

fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn read_sources(src: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    for p in source_files::rust_files(src) {
        let rel = p.strip_prefix(src).unwrap();
        // the binary (main.rs, cli/) is the top and uses the library by its crate name
        if rel.starts_with("cli") || rel == Path::new("main.rs") {
            continue;
        }
        out.push(SourceFile { module: module_of(rel), text: std::fs::read_to_string(&p).unwrap() });
    }
    out
}

/// The text without test modules (`#[cfg(test)]` up to the end of the item that follows it) and comments.
fn without_tests_and_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        // skip to the end of the next item: a `;` before any `{`, or the matching `}`
        let (mut depth, mut end) = (0usize, after.len());
        for (k, c) in after.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// Every path that starts with `crate::` or `super::` (use trees expanded): each a list of segments,
/// `super` kept as a segment to resolve later.
fn paths(text: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = |kw: &str| chars[i..].iter().take(kw.len()).copied().eq(kw.chars());
        let boundary = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':');
        if boundary && (starts("crate::") || starts("super::")) {
            let mut prefix = Vec::new();
            i = use_tree(&chars, i, &mut prefix, &mut out);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses `seg::seg::{tree, tree}` from `i`; pushes each full path onto `out`; returns where it ended.
fn use_tree(c: &[char], mut i: usize, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.clone();
    loop {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        if i < c.len() && c[i] == '{' {
            i += 1;
            loop {
                while i < c.len() && (c[i].is_whitespace() || c[i] == ',') {
                    i += 1;
                }
                if i >= c.len() || c[i] == '}' {
                    return i + 1;
                }
                i = use_tree(c, i, &mut path, out);
            }
        }
        let start = i;
        while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        if start == i {
            out.push(path);
            return i;
        }
        path.push(c[start..i].iter().collect());
        if c.get(i) == Some(&':') && c.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

struct Crate {
    /// module path -> index of its file
    files: HashMap<Vec<String>, usize>,
    /// (module path, name) -> the path a module file's `pub use` re-exports under that name
    reexports: HashMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    fn new(sources: &[SourceFile]) -> Self {
        let files = sources.iter().enumerate().map(|(i, s)| (s.module.clone(), i)).collect();
        let mut reexports = HashMap::new();
        for s in sources {
            let text = without_tests_and_comments(&s.text);
            for line in text.split(';') {
                let line = line.trim();
                let Some(tree) = line.strip_prefix("pub use ").or_else(|| line.strip_prefix("pub(crate) use ")) else { continue };
                let chars: Vec<char> = tree.chars().collect();
                let mut found = Vec::new();
                use_tree(&chars, 0, &mut Vec::new(), &mut found);
                for p in found {
                    let Some(name) = p.last().cloned() else { continue };
                    let absolute = absolute(&s.module, &p, true);
                    reexports.insert((s.module.clone(), name), absolute);
                }
            }
        }
        Crate { files, reexports }
    }

    /// The file defining `path` (absolute): the deepest module file on it, through re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<usize> {
        let mut best = None;
        for k in (0..=path.len()).rev() {
            if let Some(&f) = self.files.get(&path[..k]) {
                best = Some((k, f));
                break;
            }
        }
        let (k, f) = best?;
        if depth < 8 && k < path.len() {
            if let Some(target) = self.reexports.get(&(path[..k].to_vec(), path[k].clone())) {
                let mut t = target.clone();
                t.extend_from_slice(&path[k + 1..]);
                return self.resolve(&t, depth + 1).or(Some(f));
            }
        }
        Some(f)
    }
}

/// `path` made absolute from the module `from` (`crate::` dropped, each `super` going up one; a
/// relative `pub use child::X` in a module file starts at that module).
fn absolute(from: &[String], path: &[String], relative_to_self: bool) -> Vec<String> {
    let mut segs = path.iter().peekable();
    let mut base: Vec<String> = match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        Some("super") | Some("self") => from.to_vec(),
        _ if relative_to_self => from.to_vec(),
        _ => Vec::new(),
    };
    for s in segs {
        match s.as_str() {
            "super" => {
                base.pop();
            }
            "self" => {}
            _ => base.push(s.clone()),
        }
    }
    base
}

#[derive(Debug, PartialEq)]
enum Violation {
    Upward { file: String, uses: String, from_layer: String, to_layer: String },
    Cycle(Vec<String>),
}

fn layer_of(layers: &[&str], top: &str) -> Option<usize> {
    layers.iter().position(|l| l.split_whitespace().any(|m| m == top))
}

fn check(sources: &[SourceFile], layers: &[&str]) -> Vec<Violation> {
    let krate = Crate::new(sources);
    let name = |i: usize| sources[i].module.join("::");
    let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let text = without_tests_and_comments(&s.text);
        for p in paths(&text) {
            let abs = absolute(&s.module, &p, false);
            let Some(j) = krate.resolve(&abs, 0) else { continue };
            let target = &sources[j].module;
            if j == i || target.is_empty() || target.starts_with(&s.module) {
                continue; // itself, the crate root's re-exports (`crate::Result`), or its own parts
            }
            edges.entry(i).or_default().insert(j);
            let (from, to) = (s.module.first().map(String::as_str).unwrap_or(""), target[0].as_str());
            if from == to || from.is_empty() {
                continue;
            }
            match (layer_of(layers, from), layer_of(layers, to)) {
                (Some(a), Some(b)) if b <= a => {}
                (a, b) => out.push(Violation::Upward {
                    file: name(i),
                    uses: abs.join("::"),
                    from_layer: a.map_or(format!("{from} (in no layer)"), |a| layers[a].to_string()),
                    to_layer: b.map_or(format!("{to} (in no layer)"), |b| layers[b].to_string()),
                }),
            }
        }
    }
    for scc in strongly_connected(sources.len(), &edges) {
        if scc.len() > 1 {
            out.push(Violation::Cycle(scc.into_iter().map(name).collect()));
        }
    }
    out.dedup();
    out
}

/// Tarjan's strongly connected components.
fn strongly_connected(n: usize, edges: &BTreeMap<usize, BTreeSet<usize>>) -> Vec<Vec<usize>> {
    struct State<'a> {
        edges: &'a BTreeMap<usize, BTreeSet<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        let targets: Vec<usize> = s.edges.get(&v).map(|t| t.iter().copied().collect()).unwrap_or_default();
        for w in targets {
            match s.index[w] {
                None => {
                    visit(s, w);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                _ => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let mut s = State { edges, index: vec![None; n], low: vec![0; n], on_stack: vec![false; n], stack: Vec::new(), next: 0, out: Vec::new() };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn the_library_layers_point_down_and_no_files_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = read_sources(&src);
    let tops: BTreeSet<&str> = sources.iter().filter_map(|s| s.module.first().map(String::as_str)).collect();
    for top in &tops {
        assert!(layer_of(betadpo::LAYERS, top).is_some(), "src/{top} is in no layer of betadpo::LAYERS (src/lib.rs): add it there");
    }
    let violations = check(&sources, betadpo::LAYERS);
    assert!(violations.is_empty(), "{} layering violations:\n{}", violations.len(), violations.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join("\n"));
}

fn file(module: &str, text: &str) -> SourceFile {
    SourceFile { module: module.split("::").filter(|s| !s.is_empty()).map(String::from).collect(), text: text.into() }
}

#[test]
fn an_upward_import_is_caught_in_a_use_tree_and_in_a_path() {
    let layers = ["low", "high"];
    let clean = [file("low", "pub fn f() {}"), file("high", "use crate::low::f;")];
    assert_eq!(check(&clean, &layers), []);
    for text in ["use crate::{high::g};", "fn f() { crate::high::g() }", "use crate::{x::y, high::{g, h}};"] {
        let sources = [file("low", text), file("high", "pub fn g() {}")];
        let v = check(&sources, &layers);
        assert!(!v.is_empty() && v.iter().all(|x| matches!(x, Violation::Upward { file, .. } if file == "low")), "{text}: {v:?}");
    }
    // in a test module it is allowed
    let sources = [file("low", "#[cfg(test)]\nmod tests { use crate::high::g; }"), file("high", "pub fn g() {}")];
    assert_eq!(check(&sources, &layers), []);
}

#[test]
fn files_that_import_each_other_are_a_cycle_even_through_a_reexport() {
    let layers = ["m"];
    let sources =
        [file("m", "mod a; mod b; pub use a::A; pub use b::B;"), file("m::a", "use super::B; pub struct A;"), file("m::b", "use crate::m::A; pub struct B;")];
    let v = check(&sources, &layers);
    assert!(matches!(v.as_slice(), [Violation::Cycle(c)] if c.len() == 2), "{v:?}");
    // the module file using its own parts is no cycle
    let sources = [file("m", "mod a; pub use a::A; fn f() -> A { a::A }"), file("m::a", "use super::helper; pub struct A;")];
    assert_eq!(check(&sources, &layers), []);
}
