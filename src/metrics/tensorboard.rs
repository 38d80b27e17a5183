//! TensorBoard event files (`events.out.tfevents.*`), written without TensorFlow: one scalar per metric.
//!
//! A file is a sequence of TFRecords, each `u64 LE length`, `masked CRC32C of the 8 length bytes (u32 LE)`, the data,
//! `masked CRC32C of the data (u32 LE)`. Each record's data is an `Event` protobuf (tensorflow/core/util/event.proto),
//! encoded here by hand with only the fields we use:
//!
//! ```text
//! message Event   { double wall_time = 1; int64 step = 2; oneof what { string file_version = 3; Summary summary = 5; } }
//! message Summary { repeated Value value = 1; }
//! message Value   { string tag = 1; oneof value { float simple_value = 2; } }
//! ```
//!
//! The first event of a file carries `file_version = "brain.Event:2"`; every later one is a metrics record: its
//! `step` field is the event step, each other finite value a `simple_value` (f32) under the metric's name.
//!
//! The directory mirrors `metrics.jsonl`: [`EventWriter::rebuild`] deletes the old event files and writes one new
//! file replaying every line of it (after a resume truncated it), so TensorBoard shows exactly what the JSON lines
//! hold; training then appends to that file. A replayed record keeps the wall time the old files gave its step
//! (metrics.jsonl has no clock), else the rebuild's.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

use super::{names, Record};

/// The prefix of every event file name (TensorBoard's own readers look for it).
pub const FILE_PREFIX: &str = "events.out.tfevents.";
/// `Event.file_version` of the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

// ---------------------------------------------------------------- CRC32C and records

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so a CRC of data holding CRCs is not degenerate.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // (crc >> 15) | (crc << 17)
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord framing `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---------------------------------------------------------------- protobuf

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2): key, length, bytes.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `Event` header fields: `wall_time` (field 1, wire type 1: 8 bytes LE) and `step` (field 2, varint; left out
/// when 0, as proto3 does).
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut out = vec![0x09];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        out.push(0x10);
        varint(&mut out, step as u64);
    }
    out
}

/// The first event of a file: `Event { wall_time, file_version: "brain.Event:2" }`.
pub fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut out = event_header(wall_time, 0);
    bytes_field(&mut out, 3, FILE_VERSION.as_bytes());
    out
}

/// `Event { wall_time, step, summary: Summary { value: [Value { tag, simple_value }, ...] } }`. `simple_value` is in
/// a oneof, so it is written even when 0.0 (the reader tells a scalar from other summaries by its presence).
pub fn scalars_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::with_capacity(tag.len() + 8);
        bytes_field(&mut v, 1, tag.as_bytes());
        v.push(0x15); // field 2, wire type 5 (32-bit)
        v.extend_from_slice(&value.to_le_bytes());
        bytes_field(&mut summary, 1, &v);
    }
    let mut out = event_header(wall_time, step);
    bytes_field(&mut out, 5, &summary);
    out
}

/// A record's scalars: every value but the step, non-finite ones left out (metrics.jsonl writes them as null).
fn record_scalars(record: &Record) -> (i64, Vec<(&str, f32)>) {
    let step = record.get(names::STEP).unwrap_or(0.0) as i64;
    let scalars =
        record.values.iter().filter(|(n, v)| n != names::STEP && v.is_finite()).map(|(n, v)| (n.as_str(), *v as f32));
    (step, scalars.collect())
}

// ---------------------------------------------------------------- files

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `events.out.tfevents.<unix secs, 10 digits>.<hostname>.<pid>.<n>`, as TensorBoard's writer names its files (`n`
/// counts the files this process opened).
fn file_name() -> String {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let host = hostname().replace('/', "_");
    format!("{FILE_PREFIX}{secs:010}.{host}.{}.{}", std::process::id(), OPENED.fetch_add(1, Ordering::Relaxed))
}

/// Delete the event files in `dir` (only those: anything else there is left alone). A missing `dir` is fine.
pub fn remove_event_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(FILE_PREFIX) {
            std::fs::remove_file(entry.path()).with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Appends events to one event file, a flushed record per metrics record (a crash loses at most the one being
/// written).
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Replace the event files in `dir` by one new file holding every line of `metrics_jsonl` (missing = none),
    /// open for appending.
    pub fn rebuild(dir: &Path, metrics_jsonl: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut wall_times = old_wall_times(dir);
        remove_event_files(dir)?;
        let path = dir.join(file_name());
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { file, path };
        let mut data = frame(&file_version_event(now()));
        if let Ok(f) = File::open(metrics_jsonl) {
            let rebuilt_at = now();
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("cannot read {}", metrics_jsonl.display()))?;
                let record = parse_line(&line)
                    .with_context(|| format!("{}:{}: not a metrics line", metrics_jsonl.display(), i + 1))?;
                let (step, scalars) = record_scalars(&record);
                let wall_time = wall_times.get_mut(&step).and_then(VecDeque::pop_front).unwrap_or(rebuilt_at);
                data.extend(frame(&scalars_event(wall_time, step, &scalars)));
            }
        }
        writer.append(&data)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One metrics record as one event.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let (step, scalars) = record_scalars(record);
        self.append(&frame(&scalars_event(now(), step, &scalars)))
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The wall times of the summary events in the event files of `dir`, by step, in file-name and record order. A file
/// is read up to its first damaged record (a crash mid-write); anything unreadable just gives fewer times.
fn old_wall_times(dir: &Path) -> HashMap<i64, VecDeque<f64>> {
    let mut out: HashMap<i64, VecDeque<f64>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(FILE_PREFIX))
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        for event in records(&bytes) {
            if let Some((wall_time, step, true)) = event_header_of(event) {
                out.entry(step).or_default().push_back(wall_time);
            }
        }
    }
    out
}

/// The data of each intact record of an event file, up to the first damaged one.
fn records(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len_bytes = bytes.get(..8)?;
        if bytes.get(8..12)? != masked_crc32c(len_bytes).to_le_bytes() {
            return None;
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().ok()?)).ok()?;
        let end = len.checked_add(12)?;
        let data = bytes.get(12..end)?;
        if bytes.get(end..end.checked_add(4)?)? != masked_crc32c(data).to_le_bytes() {
            return None;
        }
        bytes = &bytes[end + 4..];
        Some(data)
    })
}

/// An `Event`'s wall time, step and whether it has a summary; `None` if it does not parse.
fn event_header_of(mut data: &[u8]) -> Option<(f64, i64, bool)> {
    fn read_varint(data: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = data.split_first()?;
            *data = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let (mut wall_time, mut step, mut summary) = (0.0, 0, false);
    while !data.is_empty() {
        let key = read_varint(&mut data)?;
        let skip = match (key >> 3, key & 7) {
            (1, 1) => {
                wall_time = f64::from_le_bytes(data.get(..8)?.try_into().ok()?);
                8
            }
            (2, 0) => {
                step = read_varint(&mut data)? as i64;
                0
            }
            (field, 2) => {
                summary |= field == 5;
                usize::try_from(read_varint(&mut data)?).ok()?
            }
            (_, 0) => read_varint(&mut data).map(|_| 0)?,
            (_, 1) => 8,
            (_, 5) => 4,
            _ => return None,
        };
        data = data.get(skip..)?;
    }
    Some((wall_time, step, summary))
}

/// A metrics.jsonl line back into a record: the step and every number (null, the non-finite values, stays out).
fn parse_line(line: &str) -> Result<Record> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)?;
    let step = v.get(names::STEP).and_then(|s| s.as_u64()).context("no integer `step`")?;
    let mut record = Record::new(step);
    for (name, value) in v.iter().filter(|(n, _)| *n != names::STEP) {
        if let Some(x) = value.as_f64() {
            record.set(name.as_str(), x);
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_check_value() {
        // The standard check value of CRC-32C (iSCSI), RFC 3720 B.4 and every CRC catalogue.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8 (mod 2^32); tensorboard's masked_crc32c agrees.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_frame_data_with_length_and_masked_crcs() {
        let r = frame(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn file_version_event_bytes() {
        // Event { wall_time = 1.5, file_version = "brain.Event:2" }:
        //   09                       key: field 1 (wall_time), wire type 1 (64-bit)   = (1 << 3) | 1
        //   00 00 00 00 00 00 f8 3f  1.5 as an f64, little-endian (0x3ff8000000000000)
        //                            (step = 0 is left out, as proto3 does)
        //   1a                       key: field 3 (file_version), wire type 2 (bytes) = (3 << 3) | 2
        //   0d                       length 13
        //   "brain.Event:2"
        let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f, 0x1a, 0x0d];
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(file_version_event(1.5), want);
    }

    #[test]
    fn scalars_event_bytes() {
        // Event { wall_time = 2.0, step = 300, summary { value { tag = "kl", simple_value = 0.5 }
        //                                                value { tag = "a/b", simple_value = -2.0 } } }:
        //   09 00 00 00 00 00 00 00 40   field 1 (64-bit): 2.0 = 0x4000000000000000 LE
        //   10 ac 02                     field 2 (varint) = (2 << 3) | 0; 300 = 0b10_0101100 → ac 02
        //   2a 17                        field 5 (summary), wire type 2 = (5 << 3) | 2; length 23 = (2 + 9) + (2 + 10)
        //     0a 09                      Summary.value (field 1, bytes), length 9 = 4 + 5
        //       0a 02 'k' 'l'            Value.tag (field 1, bytes), length 2
        //       15 00 00 00 3f           Value.simple_value (field 2, 32-bit) = (2 << 3) | 5; 0.5 = 0x3f000000 LE
        //     0a 0a                      Summary.value, length 10 = 5 + 5
        //       0a 03 'a' '/' 'b'        Value.tag, length 3
        //       15 00 00 00 c0           -2.0 = 0xc0000000 LE
        // (The same bytes as tensorboard's own event_pb2.Event(...).SerializeToString().)
        let want = [
            0x09, 0, 0, 0, 0, 0, 0, 0, 0x40, //
            0x10, 0xac, 0x02, //
            0x2a, 0x17, //
            0x0a, 0x09, 0x0a, 0x02, b'k', b'l', 0x15, 0, 0, 0, 0x3f, //
            0x0a, 0x0a, 0x0a, 0x03, b'a', b'/', b'b', 0x15, 0, 0, 0, 0xc0,
        ];
        assert_eq!(scalars_event(2.0, 300, &[("kl", 0.5), ("a/b", -2.0)]), want);
        // A zero value is still written (oneof), a zero step left out: summary length 10 = 2 + (3 + 5).
        let zero = [0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'x', 0x15, 0, 0, 0, 0];
        assert_eq!(&scalars_event(2.0, 0, &[("x", 0.0)])[9..], &zero);
    }

    #[test]
    fn records_become_scalars_without_the_step_or_non_finite_values() {
        let mut r = Record::new(7);
        r.set(names::REWARD, 0.25);
        r.set(names::KL, f64::NAN);
        r.set(names::reward_mean("correct"), f64::INFINITY);
        r.set(names::LOSS, 1.0 / 3.0);
        let (step, scalars) = record_scalars(&r);
        assert_eq!(step, 7);
        assert_eq!(scalars, vec![("reward", 0.25f32), ("loss", (1.0f64 / 3.0) as f32)]);
    }

    #[test]
    fn rebuild_replays_metrics_jsonl_into_one_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("metrics.jsonl");
        std::fs::write(&jsonl, "{\"step\":1,\"reward\":0.5,\"kl\":null}\n{\"step\":2,\"reward\":0.75}\n").unwrap();
        let tb = dir.path().join("tb");
        std::fs::create_dir_all(&tb).unwrap();
        std::fs::write(tb.join(format!("{FILE_PREFIX}1.old.1.0")), b"stale").unwrap();
        std::fs::write(tb.join("notes.txt"), b"mine").unwrap();
        let mut w = EventWriter::rebuild(&tb, &jsonl).unwrap();
        let mut r = Record::new(3);
        r.set(names::REWARD, 1.0);
        w.write(&r).unwrap();
        let files: Vec<String> =
            std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files.contains(&"notes.txt".to_string()));
        let name = w.path().file_name().unwrap().to_str().unwrap();
        let parts: Vec<&str> = name.strip_prefix(FILE_PREFIX).unwrap().split('.').collect();
        assert_eq!(parts[0].len(), 10, "{name}");
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string());

        // Walk the records: the version event, then steps 1, 2 (replayed) and 3 (written).
        let bytes = std::fs::read(w.path()).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(&bytes[at + 8..at + 12], &masked_crc32c(&bytes[at..at + 8]).to_le_bytes());
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(&bytes[at + 12 + len..at + 16 + len], &masked_crc32c(data).to_le_bytes());
            events.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(events.len(), 4);
        assert_eq!(events[0][9..], file_version_event(0.0)[9..]);
        assert_eq!(events[1][9..], scalars_event(0.0, 1, &[("reward", 0.5)])[9..]);
        assert_eq!(events[2][9..], scalars_event(0.0, 2, &[("reward", 0.75)])[9..]);
        assert_eq!(events[3][9..], scalars_event(0.0, 3, &[("reward", 1.0)])[9..]);
        assert_eq!(records(&bytes).collect::<Vec<_>>(), events);

        // Rebuilt again (a resume), after a crash cut the last record short: steps 1-2 keep their wall times, and
        // so does step 3, whose record is intact.
        let times: Vec<f64> = events[1..].iter().map(|e| event_header_of(e).unwrap().0).collect();
        std::fs::OpenOptions::new().append(true).open(w.path()).unwrap().write_all(&frame(b"cut")[..9]).unwrap();
        std::fs::write(&jsonl, "{\"step\":1,\"reward\":0.5}\n{\"step\":2,\"reward\":0.75}\n{\"step\":3}\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let w2 = EventWriter::rebuild(&tb, &jsonl).unwrap();
        assert_ne!(w2.path(), w.path());
        let bytes = std::fs::read(w2.path()).unwrap();
        let again: Vec<_> = records(&bytes).map(|e| event_header_of(e).unwrap()).collect();
        assert_eq!(again.len(), 4);
        assert_eq!(
            again[1..].iter().map(|e| (e.0, e.1, e.2)).collect::<Vec<_>>(),
            vec![(times[0], 1, true), (times[1], 2, true), (times[2], 3, true),]
        );
    }

    #[test]
    fn event_headers_parse_back() {
        assert_eq!(event_header_of(&file_version_event(1.5)), Some((1.5, 0, false)));
        assert_eq!(event_header_of(&scalars_event(2.0, 300, &[("kl", 0.5)])), Some((2.0, 300, true)));
        assert_eq!(event_header_of(&[0x09, 0, 0]), None);
    }
}
