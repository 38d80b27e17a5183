//! Whether a checkpoint's files are the ones that were written: a SHA-256 of every file, recorded in `state.json`
//! when the checkpoint is saved and compared when it is opened, and a cheap structural check of every safetensors
//! file (its header's data length against the file's), which also covers checkpoints written before the digests.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Hex SHA-256 of a file, streamed (a checkpoint's optimizer file is twice the model).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// The digest of every file in `dir` except `skip` (the state file that will hold them), by file name.
pub fn digests(dir: &Path, skip: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == skip || !entry.file_type()?.is_file() {
            continue;
        }
        out.insert(name, sha256_file(&entry.path())?);
    }
    Ok(out)
}

/// Check `dir`'s files against `recorded` digests, and every `*.safetensors` file's length against its header.
/// The error names the file and what is wrong with it.
pub fn verify(dir: &Path, recorded: &BTreeMap<String, String>) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    for name in &names {
        check_safetensors_length(&dir.join(name))?;
    }
    for (name, want) in recorded {
        let path = dir.join(name);
        if !path.is_file() {
            bail!("{} is missing (state.json lists it)", path.display());
        }
        let got = sha256_file(&path)?;
        if &got != want {
            bail!(
                "{} does not match the SHA-256 recorded in state.json when it was written (changed or damaged since)",
                path.display()
            );
        }
    }
    Ok(())
}

/// A safetensors file is an 8-byte little-endian header length, a JSON header whose tensors' `data_offsets` end at
/// the data's length, and the data: a truncated or padded file has another length than the header says.
pub fn check_safetensors_length(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let actual = file.metadata()?.len();
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        bail!("{} is truncated: {actual} bytes, not even a safetensors header", path.display());
    }
    let header_len = u64::from_le_bytes(len);
    if header_len > actual.saturating_sub(8) {
        bail!("{} is truncated: {actual} bytes, its header alone claims {header_len}", path.display());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).with_context(|| format!("cannot read {}", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{} has a corrupt safetensors header", path.display()))?;
    let data_len = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let expected = 8 + header_len + data_len;
    if actual != expected {
        let what = if actual < expected { "truncated" } else { "longer than its header says" };
        bail!("{} is {what}: {actual} bytes, its header describes {expected}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_text() {
        // FIPS 180-2's example: SHA-256("abc").
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn safetensors_length_check_finds_truncation_and_padding() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        // Header `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}` then 8 data bytes.
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&p, &bytes).unwrap();
        check_safetensors_length(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!("{:#}", check_safetensors_length(&p).unwrap_err());
        assert!(e.contains("is truncated") && e.contains(&format!("{} bytes", bytes.len() - 3)), "{e}");
        std::fs::write(&p, &bytes[..5]).unwrap();
        assert!(format!("{:#}", check_safetensors_length(&p).unwrap_err()).contains("not even a safetensors header"));
        let mut padded = bytes.clone();
        padded.push(0);
        std::fs::write(&p, &padded).unwrap();
        assert!(format!("{:#}", check_safetensors_length(&p).unwrap_err()).contains("longer than its header says"));
    }
}
