//! Data files read row by row with a size limit per row: JSONL streamed a line at a time (never the
//! whole file in memory, and never more than the limit of one line), a JSON array split into its
//! elements, each refused before it is parsed when it is longer than the limit.

use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// What a row reader hands on: where the row is (`file:line`, `file: element i`) and the row's
/// JSON, or why it is not usable (a row-level fault, which `--skip-bad-rows` may skip).
pub type RowSink<'a> = dyn FnMut(String, std::result::Result<Value, String>) -> Result<()> + 'a;

fn too_long(max_row_bytes: usize) -> String {
    format!("row is longer than --max-row-bytes ({max_row_bytes} bytes); raise --max-row-bytes or shorten the row")
}

/// Reads `path`: a JSON array if its first non-blank character is `[`, JSONL otherwise.
pub fn read_json_rows(path: &Path, max_row_bytes: usize, sink: &mut RowSink) -> Result<()> {
    let file = crate::fs_guard::open_regular(path)?;
    json_rows(BufReader::with_capacity(1 << 16, file), &path.display().to_string(), max_row_bytes, sink)
}

/// The rows `reader` holds (a file, or text already in memory as bytes): a JSON array if its first
/// non-blank character is `[`, JSONL otherwise; `name` is used in locations and errors.
pub fn json_rows(mut reader: impl BufRead, name: &str, max_row_bytes: usize, sink: &mut RowSink) -> Result<()> {
    let io = |e: std::io::Error| Error::io(name, e);
    if starts_with_array(&mut reader).map_err(io)? {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(|e| Error::Data(format!("{name}: {e}")))?;
        return array_rows(&text, name, max_row_bytes, sink);
    }
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let read = (&mut reader).take((max_row_bytes as u64).saturating_add(1)).read_until(b'\n', &mut line).map_err(io)?;
        if read == 0 {
            break;
        }
        let location = format!("{name}:{number}");
        if line.last() != Some(&b'\n') && line.len() > max_row_bytes {
            skip_line(&mut reader).map_err(io)?;
            sink(location, Err(too_long(max_row_bytes)))?;
            continue;
        }
        let text = trim_line_end(&line, number == 1);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(text)
            .map_err(|e| format!("not UTF-8 ({e})"))
            .and_then(|t| serde_json::from_str::<Value>(t).map_err(|e| format!("invalid JSON: {e}")));
        sink(location, parsed)?;
    }
    Ok(())
}

/// Whether the first character after a byte-order mark and blanks is `[`, read ahead without
/// consuming anything (so that JSONL lines keep their numbers).
fn starts_with_array(reader: &mut impl BufRead) -> std::io::Result<bool> {
    let buf = reader.fill_buf()?;
    let buf = buf.strip_prefix("\u{feff}".as_bytes()).unwrap_or(buf);
    Ok(buf.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['))
}

/// The rest of an over-long line, discarded without keeping it.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// A line without its `\n` or `\r\n` (and the first line without a byte-order mark), as `str::lines` gives it.
fn trim_line_end(line: &[u8], first: bool) -> &[u8] {
    let mut t = line.strip_suffix(b"\n").unwrap_or(line);
    t = t.strip_suffix(b"\r").unwrap_or(t);
    if first {
        t = t.strip_prefix("\u{feff}".as_bytes()).unwrap_or(t);
    }
    t
}

/// The elements of a JSON array, each checked against the limit before it is parsed. An array
/// that is not valid JSON cannot be split into rows, so it fails even in skip mode.
fn array_rows(text: &str, name: &str, max_row_bytes: usize, sink: &mut RowSink) -> Result<()> {
    let body = text.trim_start_matches('\u{feff}');
    serde_json::from_str::<serde::de::IgnoredAny>(body).map_err(|e| Error::Data(format!("{name}: invalid JSON array: {e}")))?;
    for (i, range) in array_elements(body).into_iter().enumerate() {
        let item = &body[range];
        let parsed =
            if item.len() > max_row_bytes { Err(too_long(max_row_bytes)) } else { serde_json::from_str(item).map_err(|e| format!("invalid JSON: {e}")) };
        sink(format!("{name}: element {i}"), parsed)?;
    }
    Ok(())
}

/// Byte ranges of the top-level elements of `body`, a valid JSON array.
fn array_elements(body: &str) -> Vec<Range<usize>> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start = None;
    let mut out = Vec::new();
    for (i, b) in body.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    start = Some(i + 1);
                    continue;
                }
            }
            b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 || (depth == 1 && b == b',') {
            if let Some(s) = start.take() {
                let item = body[s..i].trim();
                if !item.is_empty() {
                    let lead = body[s..i].len() - body[s..i].trim_start().len();
                    out.push(s + lead..s + lead + item.len());
                }
            }
            if depth == 1 {
                start = Some(i + 1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str, max: usize) -> Vec<(String, std::result::Result<Value, String>)> {
        let mut out = Vec::new();
        json_rows(text.as_bytes(), "f", max, &mut |l, r| {
            out.push((l, r));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn arrays_split_into_their_elements_strings_and_nesting_included() {
        let got = rows(r#" [ {"a": "x,]}"}, [1, [2]] , "s\"]", 3 ] "#, 100);
        let values: Vec<Value> = got.into_iter().map(|(_, r)| r.unwrap()).collect();
        assert_eq!(values, vec![serde_json::json!({"a": "x,]}"}), serde_json::json!([1, [2]]), serde_json::json!("s\"]"), serde_json::json!(3)]);
        assert!(rows("[]", 100).is_empty());
    }

    #[test]
    fn rows_over_the_limit_are_refused_before_parsing() {
        let got = rows("{\"a\": 1}\n\n{\"a\": \"0123456789\"}\n", 12);
        assert_eq!(got[0].0, "f:1");
        assert_eq!(got[1].0, "f:3");
        assert!(got[1].1.as_ref().unwrap_err().contains("longer than --max-row-bytes (12 bytes)"));
        let got = rows("[{\"a\": 1}, {\"a\": \"0123456789\"}]", 12);
        assert!(got[0].1.is_ok() && got[1].1.is_err(), "{got:?}");
    }

    #[test]
    fn files_stream_line_by_line_and_skip_the_rest_of_a_long_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, format!("\u{feff}{{\"a\": 1}}\r\n{{\"a\": \"{}\"}}\n\n{{\"a\": 3}}", "x".repeat(5000))).unwrap();
        let mut got = Vec::new();
        read_json_rows(&path, 100, &mut |l, r| {
            got.push((l, r.map_err(|e| e.chars().take(30).collect::<String>())));
            Ok(())
        })
        .unwrap();
        let want = vec![
            ("f:1".to_string(), Ok(serde_json::json!({"a": 1}))),
            ("f:2".to_string(), Err("row is longer than --max-row-b".to_string())),
            ("f:4".to_string(), Ok(serde_json::json!({"a": 3}))),
        ];
        let got: Vec<_> = got.into_iter().map(|(l, r)| (l.replace(&path.display().to_string(), "f"), r)).collect();
        assert_eq!(got, want);
    }
}
