//! What a whole MP4 is, decided the way a player decides it: by the file's top-level ISO-BMFF
//! boxes, never by an HTTP header.
//!
//! A box is a 32-bit big-endian size and a four-character type. Size 1 means a 64-bit size
//! follows the type; size 0 means the box runs to the end of the file. A whole file starts with
//! `ftyp` (QuickTime files may start with `wide`, `free`, `skip`, `moov` or `mdat`), contains
//! `moov` (`moof` in a fragmented file), and its boxes end exactly at the file's last byte.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Box types a file may start with.
const FIRST_BOXES: [&[u8; 4]; 6] = [b"ftyp", b"wide", b"free", b"skip", b"moov", b"mdat"];

/// Whether these first bytes start like an MP4: a box of a type a file may start with, whose
/// size field is possible. Undecided (false) below 8 bytes.
pub fn looks_like_mp4(head: &[u8]) -> bool {
    if head.len() < 8 {
        return false;
    }
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    FIRST_BOXES.iter().any(|t| &head[4..8] == *t) && (size <= 1 || size >= 8)
}

/// Whether the first `len` bytes of `file` are a whole MP4, or why not (one line, for
/// `last_error`). A body cut short almost never ends on a box boundary, and an encoder that had
/// not finished leaves no `moov`: nothing at the HTTP level can tell either.
pub fn check(file: &File, len: u64) -> Result<(), String> {
    let read = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| format!("reading the box at byte {at}: {e}"))
    };
    let mut at = 0u64;
    let mut movie = false;
    while at < len {
        if len - at < 8 {
            return Err(format!("{} stray bytes after the last box", len - at));
        }
        let mut h = [0u8; 16];
        read(&mut h[..8], at)?;
        let kind = [h[4], h[5], h[6], h[7]];
        if at == 0 && !looks_like_mp4(&h[..8]) {
            return Err("it does not start with an MP4 box (ftyp, moov, mdat, ...)".into());
        }
        movie |= &kind == b"moov" || &kind == b"moof";
        let (size, header) = match u32::from_be_bytes([h[0], h[1], h[2], h[3]]) {
            // The last box, running to the end of the file.
            0 => {
                at = len;
                break;
            }
            1 => {
                if len - at < 16 {
                    return Err(format!("the box at byte {at} is cut short"));
                }
                read(&mut h[8..16], at + 8)?;
                let mut big = [0u8; 8];
                big.copy_from_slice(&h[8..16]);
                (u64::from_be_bytes(big), 16)
            }
            n => (u64::from(n), 8),
        };
        if size < header {
            return Err(format!(
                "the box at byte {at} has an impossible size {size}"
            ));
        }
        if size > len - at {
            return Err(format!(
                "the {} box at byte {at} runs {} bytes past the end of the file ({len} bytes)",
                String::from_utf8_lossy(&kind),
                size - (len - at)
            ));
        }
        at += size;
    }
    if len == 0 {
        return Err("the file is empty".into());
    }
    if !movie {
        return Err("it has no moov box (an encoder that had not finished?)".into());
    }
    debug_assert_eq!(at, len);
    Ok(())
}

/// MP4-shaped bytes for the unit tests here and in `archive`.
#[cfg(test)]
pub(crate) mod sample {
    /// A box of `kind` holding `body` bytes of filler.
    pub fn boxed(kind: &[u8; 4], body: usize) -> Vec<u8> {
        let mut v = ((body + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend((0..body).map(|i| (i % 251) as u8));
        v
    }

    /// `ftyp`, a small `moov`, then an `mdat` of `n` bytes: a whole MP4.
    pub fn whole(n: usize) -> Vec<u8> {
        let mut v = boxed(b"ftyp", 8);
        v.extend(boxed(b"moov", 24));
        v.extend(boxed(b"mdat", n));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::sample::{boxed, whole as mp4};
    use super::*;

    fn check_bytes(bytes: &[u8]) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, bytes).unwrap();
        check(&File::open(&p).unwrap(), bytes.len() as u64)
    }

    #[test]
    fn only_whole_box_sequences_with_a_movie_pass() {
        let whole = mp4(1000);
        assert_eq!(check_bytes(&whole), Ok(()));
        for cut in [0, 9, 15, 20, 23, 500, whole.len() - 1] {
            assert!(check_bytes(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = whole.clone();
        longer.extend_from_slice(b"xx");
        let e = check_bytes(&longer).unwrap_err();
        assert!(e.contains("2 stray bytes"), "{e}");
        // 64-bit sizes, and a last box that runs to the end (size 0).
        let mut big = boxed(b"ftyp", 8);
        big.extend(boxed(b"moov", 8));
        big.extend_from_slice(b"\0\0\0\x01mdat");
        big.extend_from_slice(&(16u64 + 100).to_be_bytes());
        big.extend_from_slice(&[7; 100]);
        assert_eq!(check_bytes(&big), Ok(()));
        let mut open_ended = boxed(b"ftyp", 8);
        open_ended.extend(boxed(b"moof", 8));
        open_ended.extend_from_slice(b"\0\0\0\0mdat");
        open_ended.extend_from_slice(&[7; 100]);
        assert_eq!(check_bytes(&open_ended), Ok(()));
        // QuickTime's own first boxes.
        let mut qt = boxed(b"wide", 0);
        qt.extend(boxed(b"mdat", 50));
        qt.extend(boxed(b"moov", 20));
        assert_eq!(check_bytes(&qt), Ok(()));
    }

    #[test]
    fn a_file_without_a_movie_box_is_not_whole() {
        // An encoder that had not finished: its mdat runs to the end, and there is no moov.
        let mut v = boxed(b"ftyp", 8);
        v.extend_from_slice(b"\0\0\0\0mdat");
        v.extend_from_slice(&[1; 300]);
        let e = check_bytes(&v).unwrap_err();
        assert!(e.contains("no moov"), "{e}");
        let mut tiled = boxed(b"ftyp", 8);
        tiled.extend(boxed(b"mdat", 300));
        assert!(check_bytes(&tiled).unwrap_err().contains("no moov"));
    }

    #[test]
    fn a_box_past_the_end_is_named() {
        let mut v = mp4(100);
        let n = v.len();
        v.truncate(n - 10);
        let e = check_bytes(&v).unwrap_err();
        assert!(
            e.contains("mdat box") && e.contains("10 bytes past the end"),
            "{e}"
        );
    }

    #[test]
    fn first_bytes() {
        assert!(looks_like_mp4(b"\0\0\0\x18ftypisom"));
        assert!(looks_like_mp4(b"\0\0\0\x08wide"));
        assert!(looks_like_mp4(b"\0\0\0\x01mdat"));
        assert!(!looks_like_mp4(b"{\"error\":"));
        assert!(!looks_like_mp4(b"<html><b"));
        assert!(
            !looks_like_mp4(b"\0\0\0\x04ftyp"),
            "a size below the header"
        );
        assert!(!looks_like_mp4(b"\0\0\0\x18ft"));
        assert!(
            !looks_like_mp4(b"\0\0\0\x18moof"),
            "a fragment is not a file's start"
        );
    }
}
