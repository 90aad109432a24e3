//! The README and docs/ stay true to the program: every `betadpo <command> --flag` in their code blocks
//! is a flag that command's `--help` lists, every command exists, and every relative link points at a file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pages() -> Vec<PathBuf> {
    let mut v = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> =
        std::fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "md")).collect();
    docs.sort();
    v.extend(docs);
    v
}

/// The lines inside ``` blocks.
fn code_lines(text: &str) -> Vec<&str> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if inside {
            out.push(line);
        }
    }
    out
}

/// `(subcommand, flags)` of each betadpo command in `lines`: a line running `betadpo SUB` (or `cargo run
/// --release -- SUB`), with the lines that continue it (after a trailing `\`, or indented under it).
fn commands(lines: &[&str]) -> Vec<(String, Vec<String>)> {
    let flag = regex::Regex::new(r"(?:^|[\s\[|(])(--[a-z][a-z0-9-]*)").unwrap();
    let start = regex::Regex::new(r"(?:^|\s)(?:betadpo|target/release/betadpo|cargo run --release --) ([a-z][a-z-]*)").unwrap();
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut open = false;
    for line in lines {
        let code = line.split(" # ").next().unwrap_or(line);
        if let Some(c) = start.captures(code) {
            let sub = c[1].to_string();
            let at = c.get(0).unwrap().end();
            out.push((sub, flag.captures_iter(&code[at..]).map(|f| f[1].to_string()).collect()));
            open = true;
        } else if open && (line.starts_with(' ') || line.starts_with('\t')) && !line.trim().is_empty() {
            let last = out.last_mut().unwrap();
            last.1.extend(flag.captures_iter(code).map(|f| f[1].to_string()));
        } else {
            open = false;
        }
    }
    out
}

fn help_flags(sub: &str) -> Option<BTreeSet<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_betadpo")).args([sub, "--help"]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let flag = regex::Regex::new(r"--[a-z][a-z0-9-]*").unwrap();
    Some(flag.find_iter(&text).map(|m| m.as_str().to_string()).collect())
}

#[test]
fn every_documented_command_and_flag_exists() {
    let mut helps: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root()).unwrap().display().to_string();
        for (sub, flags) in commands(&code_lines(&text)) {
            let help = helps.entry(sub.clone()).or_insert_with(|| help_flags(&sub));
            let Some(help) = help else {
                problems.push(format!("{name}: `betadpo {sub}` is not a command"));
                continue;
            };
            for f in flags {
                checked += 1;
                if !help.contains(&f) && f != "--help" {
                    problems.push(format!("{name}: `betadpo {sub} {f}`: no such flag in `betadpo {sub} --help`"));
                }
            }
        }
    }
    problems.dedup();
    assert!(checked > 50, "only {checked} documented flags found: the parser lost the commands");
    assert!(problems.is_empty(), "{} documented flags that do not exist:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn every_relative_link_points_at_a_file() {
    let link = regex::Regex::new(r"\]\(([^)#\s]+)(?:#[^)]*)?\)").unwrap();
    let mut missing = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for c in link.captures_iter(&text) {
            let target = &c[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = page.parent().unwrap().join(target);
            if !Path::new(&path).exists() {
                missing.push(format!("{}: {target}", page.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "links to missing files:\n{}", missing.join("\n"));
}

#[test]
fn the_parser_finds_flags_on_continued_and_indented_lines() {
    let lines =
        ["betadpo train --artifacts a \\", "    --lr 1e-6 [--epochs 1 | --max-steps N]", "echo --not-a-flag", "cargo run --release -- quickstart --out q"];
    let c = commands(&lines);
    assert_eq!(c[0], ("train".to_string(), vec!["--artifacts".into(), "--lr".into(), "--epochs".into(), "--max-steps".into()]));
    assert_eq!(c[1], ("quickstart".to_string(), vec!["--out".into()]));
}

#[test]
fn the_readme_leads_in_at_most_200_lines() {
    let n = std::fs::read_to_string(root().join("README.md")).unwrap().lines().count();
    assert!(n <= 200, "README.md has {n} lines; move detail into docs/");
}

/// Every text file the checker reads for `scripts/…` paths: the docs, the CI entry point, the Rust sources
/// and tests (error messages and comments name scripts) and the scripts themselves.
fn files_naming_scripts() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_symlink() || name.starts_with('.') || name == "target" || name == "fixtures" && dir.ends_with("tests") {
                continue;
            }
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| ["md", "rs", "py", "sh"].iter().any(|e| x == *e)) {
                out.push(path);
            }
        }
    }
    let mut out = pages();
    out.push(root().join(".ci/run"));
    for dir in ["src", "tests", "scripts"] {
        walk(&root().join(dir), &mut out);
    }
    out
}

#[test]
fn every_script_path_named_in_the_repository_exists() {
    let named = regex::Regex::new(r"(?:^|[^\w./-])(scripts/[\w./-]*[\w/])").unwrap();
    let mut missing = BTreeSet::new();
    for file in files_naming_scripts() {
        let text = std::fs::read_to_string(&file).unwrap();
        for c in named.captures_iter(&text) {
            let path = &c[1];
            // the virtual environments are made by scripts/tools/setup_venv.sh, not committed
            if !path.starts_with("scripts/.venv") && !root().join(path).exists() {
                missing.insert(format!("{}: {path}", file.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "paths under scripts/ that do not exist:\n{}", missing.into_iter().collect::<Vec<_>>().join("\n"));
}
