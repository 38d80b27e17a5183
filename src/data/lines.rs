//! Reading JSONL files line by line with a bound on a line's length, so one runaway line (a whole corpus on one
//! line, a binary file) is an error naming its line instead of gigabytes of memory: tokenising a 50 MB prompt took
//! 8 GB.

use std::io::{BufRead, BufReader, Read};

/// The longest line accepted, in bytes: far beyond any context window (about 2M tokens of text).
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// The lines of `reader` (without their `\n` or `\r\n`, and without a UTF-8 byte-order mark before the first) with
/// their 1-based numbers. A line longer than `max` bytes (its line ending not counted), or not UTF-8, is an error
/// naming the line.
pub fn bounded_lines<R: Read>(reader: R, max: usize) -> impl Iterator<Item = std::io::Result<(usize, String)>> {
    let mut reader = BufReader::new(reader);
    let mut number = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        number += 1;
        let mut buf = Vec::new();
        // Room for the longest line and its `\r\n`: anything longer stops short of its newline.
        let read = (&mut reader).take(max as u64 + 2).read_until(b'\n', &mut buf);
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if number == 1 && buf.starts_with(&[0xef, 0xbb, 0xbf]) {
            buf.drain(..3);
        }
        let result = match read {
            Ok(0) => return None,
            Err(e) => Err(e),
            Ok(_) if buf.len() > max => {
                Err(std::io::Error::other(format!("line {number} is longer than {} MiB", max >> 20)))
            }
            Ok(_) => String::from_utf8(buf)
                .map(|line| (number, line))
                .map_err(|_| std::io::Error::other(format!("line {number} is not UTF-8 text"))),
        };
        failed = result.is_err();
        Some(result)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_a_long_one_is_refused_naming_it() {
        let text = "a\r\nbb\n\nccc";
        let got: Vec<(usize, String)> = bounded_lines(text.as_bytes(), 3).map(Result::unwrap).collect();
        assert_eq!(got, [(1, "a".into()), (2, "bb".into()), (3, String::new()), (4, "ccc".into())]);
        // Exactly `max` bytes before the newline is fine; one more is not, and reading stops there.
        let text = "abc\nabcd\nx\n";
        let mut it = bounded_lines(text.as_bytes(), 3);
        assert_eq!(it.next().unwrap().unwrap(), (1, "abc".into()));
        assert!(it.next().unwrap().unwrap_err().to_string().contains("line 2 is longer than"));
        assert!(it.next().is_none());
        // A line of exactly `max` bytes passes with either line ending; a BOM before line 1 is dropped.
        let got: Vec<_> = bounded_lines("abc\r\nabc\n".as_bytes(), 3).map(Result::unwrap).collect();
        assert_eq!(got, [(1, "abc".into()), (2, "abc".into())]);
        let got: Vec<_> = bounded_lines("\u{feff}{}\n".as_bytes(), 10).map(Result::unwrap).collect();
        assert_eq!(got, [(1, "{}".into())]);
        let bad = [b'o', b'k', b'\n', 0xff, b'\n'];
        let errs: Vec<_> = bounded_lines(&bad[..], 10).collect();
        assert!(errs[1].as_ref().unwrap_err().to_string().contains("line 2 is not UTF-8"));
    }
}
