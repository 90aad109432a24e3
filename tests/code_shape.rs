//! The shape of the library's code, checked so it stays readable: every function in `src/` fits in
//! 100 lines, and every file opens with a `//!` line saying what it is (generated code aside).

#[path = "common/source_files.rs"]
mod source_files;

use std::path::Path;

const MAX_FUNCTION_LINES: usize = 100;

fn is_generated(text: &str) -> bool {
    text.lines().next().is_some_and(|l| l.contains("@generated"))
}

/// A line with its string and char literals emptied and its comment dropped, so braces in them do not count.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => break,
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            // a char literal ('{', '\n'), not a lifetime ('a): the closing quote follows within two chars
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    chars.nth(rest.find('\'').filter(|&i| i > 1).unwrap_or(2));
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.nth(1);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn starts_function(line: &str) -> Option<String> {
    let t = line.trim_start();
    let words: Vec<&str> = t.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "fn")?;
    let before_ok = words[..at].iter().all(|w| w.starts_with("pub") || ["const", "async", "unsafe", "extern", "\"C\""].contains(w));
    let name = words.get(at + 1)?.split(['(', '<']).next()?.to_string();
    (before_ok && !name.is_empty()).then_some(name)
}

/// Every function's name, first line (1-based) and length in lines, from its `fn` line to its closing brace.
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<String> = text.lines().map(code_of).collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = starts_function(line) else { continue };
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => (depth, opened) = (depth + 1, true),
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (opened && depth == 0) || (!opened && l.trim_end().ends_with(';')) {
                found.push((name.clone(), i + 1, j - i + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn every_function_fits_in_100_lines_and_every_file_says_what_it_is() {
    let files = source_files::rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(files.len() > 100, "found only {} source files", files.len());
    let mut problems = Vec::new();
    let mut functions = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if is_generated(&text) {
            continue;
        }
        if !text.starts_with("//!") {
            problems.push(format!("{}: does not open with a //! line", f.display()));
        }
        for (name, line, len) in function_lengths(&text) {
            functions += 1;
            if len > MAX_FUNCTION_LINES {
                problems.push(format!("{}:{line}: fn {name} is {len} lines (at most {MAX_FUNCTION_LINES})", f.display()));
            }
        }
    }
    assert!(functions > 1000, "found only {functions} functions: the scan is broken");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_measure_counts_a_function_from_fn_to_its_closing_brace() {
    let long: String = format!("//! x\n\npub(crate) fn long(a: &str) -> char {{\n{}    '}}'\n}}\n\nfn next() {{}}\n", "    let _ = \"}}{{\";\n".repeat(120));
    let found = function_lengths(&long);
    assert_eq!(found, vec![("long".to_string(), 3, 123), ("next".to_string(), 127, 1)]);
    let declared = "trait T {\n    fn f(&self) -> u8;\n    fn g(&self) -> u8 {\n        1\n    }\n}\n";
    assert_eq!(function_lengths(declared), vec![("f".to_string(), 2, 1), ("g".to_string(), 3, 3)]);
}
