//! Video IDs: the one check every ID passes before it can name a file or a URL, and the hex
//! spelling of hashes.

use std::fmt;

/// A video ID that passed the check: 1-128 characters of `[A-Za-z0-9_-]`, not starting with
/// `-`. Only a `VideoId` can become part of a path or URL, so nothing else ever does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VideoId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid video id")]
pub struct InvalidId;

impl VideoId {
    pub fn parse(s: &str) -> Result<VideoId, InvalidId> {
        let ok = (1..=128).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(VideoId(s.to_owned()))
        } else {
            Err(InvalidId)
        }
    }

    /// An ID as a producer queued it: surrounding ASCII whitespace (the newline of an `echo`)
    /// is not part of it. Says whether any was trimmed, so that the caller can log it.
    pub fn from_queued(raw: &str) -> Result<(VideoId, bool), InvalidId> {
        let trimmed = raw.trim_matches(|c: char| c.is_ascii_whitespace());
        VideoId::parse(trimmed).map(|id| (id, trimmed.len() != raw.len()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VideoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["video_abc123", "a", "A-b_9", &"x".repeat(128)] {
            assert!(VideoId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "../x",
            "a/b",
            "a.b",
            "a b",
            "a\0b",
            "é",
            "a\\b",
            "%2e%2e",
            " x",
            &"x".repeat(129),
        ] {
            assert_eq!(VideoId::parse(bad), Err(InvalidId), "{bad:?}");
        }
        let (id, trimmed) = VideoId::from_queued("video_x\n").unwrap();
        assert_eq!((id.as_str(), trimmed), ("video_x", true));
        let (id, trimmed) = VideoId::from_queued(" \tvideo_y\r\n").unwrap();
        assert_eq!((id.as_str(), trimmed), ("video_y", true));
        assert!(!VideoId::from_queued("video_z").unwrap().1);
        for bad in ["", " \n", "a b\n", "\u{a0}video_x"] {
            assert_eq!(VideoId::from_queued(bad), Err(InvalidId), "{bad:?}");
        }
    }
}
