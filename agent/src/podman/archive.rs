//! The tar archive [`RuntimeOp::CopyFile`](podfleet_core::runtime::RuntimeOp::CopyFile)
//! sends to `PUT /containers/{id}/archive?path=/`: one regular file, owned
//! by root, at its path relative to `/`.
//!
//! A minimal ustar writer (POSIX.1-1988): a 512-byte header with its
//! checksum, the data padded to 512 bytes, two zero blocks at the end. It
//! writes no directory entries: podman (and Docker) create missing parent
//! directories themselves, root-owned with mode 0755, whereas an entry for a
//! directory that exists would reset its mode (a `/tmp` with 1777 would
//! become 0755).

use podfleet_core::runtime::{copy_file_target, RuntimeError, RuntimeErrorKind};
use podfleet_core::wire::text::Quoted;

const BLOCK: usize = 512;
/// The name field; a longer path goes partly into the prefix field.
const NAME_LEN: usize = 100;
const PREFIX_LEN: usize = 155;

/// A tar archive holding `content` as the regular file `path` (absolute,
/// stored relative to `/`), with permission bits `mode` (masked to 0o7777),
/// uid and gid 0, and modification time `mtime` (seconds since the epoch).
///
/// # Errors
///
/// [`RuntimeErrorKind::Other`], naming the path, when `path` is not a
/// [`copy_file_target`], or is too long for a ustar header, or the content
/// is 8 GiB or more.
pub(super) fn single_file(
    path: &str,
    content: &[u8],
    mode: u32,
    mtime: u64,
) -> Result<Vec<u8>, RuntimeError> {
    let relative = copy_file_target(path)?;
    let (prefix, name) = split_name(relative).ok_or_else(|| {
        refused(
            path,
            "the path is too long for a tar header (at most 155 bytes before a `/` and 100 after it)",
        )
    })?;
    let mut header = [0u8; BLOCK];
    put(&mut header[0..NAME_LEN], name.as_bytes());
    put_octal(&mut header[100..108], u64::from(mode & 0o7777));
    put_octal(&mut header[108..116], 0);
    put_octal(&mut header[116..124], 0);
    let size = u64::try_from(content.len()).unwrap_or(u64::MAX);
    if size >= 8 << 30 {
        return Err(refused(
            path,
            &format!("{size} bytes are too many for a ustar entry"),
        ));
    }
    put_octal(&mut header[124..136], size);
    put_octal(&mut header[136..148], mtime.min(0o77_777_777_777));
    header[156] = b'0';
    put(&mut header[257..263], b"ustar\0");
    put(&mut header[263..265], b"00");
    put(&mut header[265..297], b"root");
    put(&mut header[297..329], b"root");
    put(&mut header[345..345 + PREFIX_LEN], prefix.as_bytes());
    // The checksum is computed with its own field as eight spaces, and
    // written as six octal digits, a NUL and a space.
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    put(&mut header[148..156], format!("{sum:06o}\0 ").as_bytes());

    let padded = content.len().div_ceil(BLOCK) * BLOCK;
    let mut archive = Vec::with_capacity(BLOCK + padded + 2 * BLOCK);
    archive.extend_from_slice(&header);
    archive.extend_from_slice(content);
    archive.resize(BLOCK + padded + 2 * BLOCK, 0);
    Ok(archive)
}

/// Splits `path` into ustar's prefix and name fields, at a `/`.
fn split_name(path: &str) -> Option<(&str, &str)> {
    if path.len() <= NAME_LEN {
        return Some(("", path));
    }
    path.match_indices('/')
        .map(|(at, _)| (&path[..at], &path[at + 1..]))
        .find(|(prefix, name)| prefix.len() <= PREFIX_LEN && name.len() <= NAME_LEN)
}

fn refused(path: &str, why: &str) -> RuntimeError {
    RuntimeError::new(
        RuntimeErrorKind::Other,
        format!("cannot copy a file to {}: {why}", Quoted(path)),
    )
}

fn put(field: &mut [u8], bytes: &[u8]) {
    let n = bytes.len().min(field.len());
    field[..n].copy_from_slice(&bytes[..n]);
}

/// `value` in octal, zero-padded to fill `field` but for a closing NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    put(field, format!("{value:0width$o}\0").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(header: &[u8], range: std::ops::Range<usize>) -> &str {
        let bytes = &header[range];
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap()
    }

    #[test]
    fn one_file_makes_a_header_its_padded_data_and_two_zero_blocks() {
        let archive =
            single_file("/.podfleet/setup.sh", b"exit 0\n", 0o700, 1_700_000_000).unwrap();
        assert_eq!(archive.len(), 4 * BLOCK);
        let header = &archive[..BLOCK];
        assert_eq!(field(header, 0..100), ".podfleet/setup.sh");
        assert_eq!(field(header, 100..108), "0000700");
        assert_eq!(field(header, 108..116), "0000000");
        assert_eq!(field(header, 124..136), "00000000007");
        assert_eq!(header[156], b'0');
        assert_eq!(&header[257..265], b"ustar\x0000");
        assert_eq!(&archive[BLOCK..BLOCK + 7], b"exit 0\n");
        assert!(archive[BLOCK + 7..].iter().all(|&b| b == 0));
        // The checksum: every header byte, its own field counted as spaces.
        let stored = u32::from_str_radix(field(header, 148..154), 8).unwrap();
        let sum: u32 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| u32::from(if (148..156).contains(&i) { b' ' } else { b }))
            .sum();
        assert_eq!(stored, sum);
        assert_eq!(&header[154..156], b"\0 ");
    }

    #[test]
    fn data_of_a_whole_block_gets_no_padding_block() {
        let archive = single_file("/a", &[b'x'; BLOCK], 0o644, 0).unwrap();
        assert_eq!(archive.len(), 4 * BLOCK);
        let empty = single_file("/a", b"", 0o644, 0).unwrap();
        assert_eq!(empty.len(), 3 * BLOCK);
    }

    #[test]
    fn a_long_path_is_split_into_prefix_and_name() {
        let dir = "d".repeat(120);
        let path = format!("/{dir}/setup.sh");
        let archive = single_file(&path, b"", 0o700, 0).unwrap();
        assert_eq!(field(&archive, 0..100), "setup.sh");
        assert_eq!(field(&archive, 345..500), dir);
        let unsplittable = format!("/{}", "n".repeat(101));
        assert!(single_file(&unsplittable, b"", 0o700, 0).is_err());
    }

    #[test]
    fn paths_that_are_not_plain_absolute_ones_are_refused_by_name() {
        for path in [
            "setup.sh",
            "/",
            "/a/",
            "/a//b",
            "/a/../etc/passwd",
            "/./a",
            "/a/..",
            "/a\0b",
            "",
        ] {
            let refused = single_file(path, b"", 0o700, 0).err();
            assert_eq!(
                refused.as_ref().map(|e| e.kind),
                Some(RuntimeErrorKind::Other),
                "{path:?}"
            );
            let message = refused.map(|e| e.message).unwrap();
            assert!(message.contains(&format!("{:?}", path)), "{message}");
        }
    }
}
